"""What a bulk job writes for each image, named after the input's key.

``--outputs`` picks among:

- ``image``: ``<key>.png``, the detailed image (the default);
- ``mask``: ``<key>.mask.png``, the combined face mask;
- ``crops``: ``<key>.refined-<i>.png`` and ``<key>.alpha-<i>.png`` (the node's
  ``cropped_refined`` and ``cropped_enhanced_alpha``), and ``<key>.cnet-<i>.png`` when a
  ControlNet ran;
- ``json``: ``<key>.json``, the per-face report (``POST /v1/detail?format=json``'s ``segments``,
  counts and timings, without the images).

PNGs are encoded as the service encodes them (:func:`serve_app.images.encode_png`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from serve_app.images import encode_png
from serve_app.pipeline import ImageResult, SegmentReport

OUTPUT_KINDS = ("image", "mask", "crops", "json")
DEFAULT_OUTPUTS = ("image",)


def parse_outputs(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"image,mask"`` or ``["image", "mask"]`` → the kinds in canonical order; ValueError for others."""
    items = value.split(",") if isinstance(value, str) else list(value)
    kinds = {item.strip() for item in items if item.strip()}
    unknown = kinds - set(OUTPUT_KINDS)
    if unknown:
        raise ValueError(f"outputs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(OUTPUT_KINDS)}")
    if not kinds:
        raise ValueError(f"outputs: name at least one of {', '.join(OUTPUT_KINDS)}")
    return tuple(kind for kind in OUTPUT_KINDS if kind in kinds)


def output_files(key: str, result: ImageResult, kinds: Sequence[str], report: dict[str, Any]) -> dict[str, bytes]:
    """``{relative name: bytes}`` of one image's outputs; the JSON report last."""
    files: dict[str, bytes] = {}
    if "image" in kinds:
        files[f"{key}.png"] = encode_png(result.image)
    if "mask" in kinds:
        files[f"{key}.mask.png"] = encode_png(result.mask)
    if "crops" in kinds:
        for index, crop in enumerate(result.cropped_refined):
            files[f"{key}.refined-{index}.png"] = encode_png(crop)
        for index, crop in enumerate(result.cropped_enhanced_alpha):
            files[f"{key}.alpha-{index}.png"] = encode_png(crop)
        for index, crop in enumerate(result.cnet_images):
            files[f"{key}.cnet-{index}.png"] = encode_png(crop)
    if "json" in kinds:
        files[f"{key}.json"] = (json.dumps(report, indent=1) + "\n").encode()
    return files


def face_report(input_name: str, result: ImageResult, timings: dict[str, float]) -> dict[str, Any]:
    """The ``json`` output: what ``?format=json`` says about the faces, without images."""
    from serve_app.http_adapters.encoding import segment_json

    height, width = result.image.shape[:2]
    return {
        "input": input_name,
        "width": width,
        "height": height,
        "faces_detected": len(result.segments),
        "faces_refined": len(result.cropped_refined),
        "segments": [segment_json(segment) for segment in result.segments],
        "timings": timings,
    }


def seeds_of(segments: Sequence[SegmentReport]) -> list[int | None]:
    return [segment.seed for segment in segments]
