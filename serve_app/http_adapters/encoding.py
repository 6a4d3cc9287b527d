"""Encoding results and errors for HTTP: every output as base64 PNGs, errors as ``{"error": …}``."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from serve_app.http_adapters.errors import RequestError
from serve_app.images import encode_png_base64
from serve_app.pipeline import DetailResult, SegmentReport

RETRY_AFTER_S = 5  # what a 429/503 tells the caller to wait


def error_body(error: RequestError) -> dict[str, Any]:
    content: dict[str, Any] = {"error": error.message}
    if error.details is not None:
        content["details"] = error.details
    return content


def error_response(error: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status_code in (429, 503) else {}
    headers.update(error.headers)  # e.g. a quota's own Retry-After, WWW-Authenticate
    return JSONResponse(error_body(error), status_code=error.status_code, headers=headers)


def result_to_json(result: DetailResult) -> dict[str, Any]:
    """Every output of spec §8 as base64 PNGs, plus per-face metadata and stage timings."""
    per_image = result.per_image
    images = [encode_png_base64(image) for image in result.images]  # each PNG encoded once
    masks = [encode_png_base64(item.mask) for item in per_image]
    return {
        "image": images[0],
        "images": images,
        "mask": masks[0],
        "masks": masks,
        "cropped_refined": [encode_png_base64(crop) for crop in result.cropped_refined],
        "cropped_enhanced_alpha": [encode_png_base64(crop) for crop in result.cropped_enhanced_alpha],
        "cnet_images": [encode_png_base64(image) for image in result.cnet_images],
        "segments": [[segment_json(segment) for segment in item.segments] for item in per_image],
        "faces_detected": sum(len(item.segments) for item in per_image),
        "faces_refined": sum(len(item.cropped_refined) for item in per_image),
        "timings": result.timings,
        "detailer_pipe": result.detailer_pipe,
    }


def segment_json(segment: SegmentReport) -> dict[str, Any]:
    return {
        "index": segment.index,
        "bbox": list(segment.bbox),
        "crop_region": list(segment.crop_region),
        "confidence": segment.confidence,
        "label": segment.label,
        "seed": segment.seed,
        "upscale": segment.upscale,
        "upscaled_size": list(segment.upscaled_size) if segment.upscaled_size else None,
        "skipped": segment.skipped,
        "skip_reason": segment.skip_reason,
        "prompt": segment.prompt,
    }
