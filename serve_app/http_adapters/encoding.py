"""Encoding results and errors for HTTP: every output as base64 PNGs, errors in one JSON shape.

Every error the service answers, on every route, is ``{"error", "status", "request_id",
"details"}``: ``error`` says what is wrong (never exception text or a server path),
``details`` lists ``{"field", "message", …}`` for the inputs it is about (empty when none),
``request_id`` is the request's id, also in the ``X-Request-ID`` header and the server's log
line for it (:mod:`serve_app.http_adapters.request_ids`).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from fastapi.responses import JSONResponse

from serve_app.http_adapters.errors import RequestError
from serve_app.http_adapters.request_ids import current_request_id, new_request_id
from serve_app.images import encode_png_base64
from serve_app.pipeline import DetailResult, SegmentReport

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 5  # what a 429/503 tells the caller to wait


def error_body(error: RequestError) -> dict[str, Any]:
    """The error shape (the request's id, or a fresh one outside an HTTP request)."""
    details = [
        {key: without_server_paths(value) if isinstance(value, str) else value for key, value in item.items()}
        if isinstance(item, dict) else item
        for item in error.details or []
    ]  # fmt: skip
    return {
        "error": without_server_paths(error.message),
        "status": error.status_code,
        "request_id": current_request_id() or new_request_id(),
        "details": details,
    }


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/(?:[\w.+@~-]+/)*[\w.+@~-]+")


def without_server_paths(text: str) -> str:
    """``text`` with every absolute path that exists on this machine cut to ``…/<last part>``.

    A message may quote a configured model path or a folder a name was checked against; a path
    the client sent that is not here (e.g. a refused ``/etc/x.safetensors``) stays as sent.
    """
    if "/" not in text:
        return text

    def cut(match: re.Match[str]) -> str:
        path = match.group(0)
        try:
            exists = os.path.lexists(path)
        except (OSError, ValueError):
            exists = False
        return f".../{path.rstrip('/').rsplit('/', 1)[-1]}" if exists and path != "/" else path

    return _ABSOLUTE_PATH.sub(cut, text)


def error_response(error: RequestError) -> JSONResponse:
    """The error as a response, logged with the request id (the line an operator finds it by)."""
    body = error_body(error)
    level = logging.WARNING if error.status_code >= 500 else logging.INFO
    logger.log(level, "request %s: %d %s", body["request_id"], error.status_code, error.message[:300])
    headers = dict(error.headers)
    if error.status_code in (429, 503):
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return JSONResponse(body, status_code=error.status_code, headers=headers or None)


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


_LOCAL_PATH = re.compile(r"^(?:file://)?(?:/|~/|[A-Za-z]:[\\/]|\\\\)")


def public_info(value: Any) -> Any:
    """``GET /v1/info`` without the server's file system: every local path (absolute, home-relative
    or ``file://``; a model the config names by path, or the file a reference resolved to) is cut
    to its last component. Names and references (``hf://…``, ``pkg://…``, ``sim://…``) stay."""
    if isinstance(value, dict):
        return {key: public_info(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [public_info(item) for item in value]
    if isinstance(value, str) and _LOCAL_PATH.match(value):
        name = re.split(r"[\\/]", value.rstrip("/\\"))[-1]
        return f".../{name}" if name else "..."
    return value
