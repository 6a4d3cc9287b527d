"""Reading ``/v1/detail`` bodies: multipart (image files + fields) or JSON (base64 images + params).

Limits are checked before anything is decoded: the declared body size, the number of images,
and each image's bytes and pixels (:mod:`serve_app.images`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import Request

from facedetailer.params import FaceDetailerParams
from serve_app.config import Limits
from serve_app.http_adapters.errors import RequestError, json_object
from serve_app.images import decode_base64_image, decode_image

MAX_WORKFLOW_BYTES = 5 * 1024 * 1024
_WORKFLOW_DOC = "a ComfyUI workflow (API or UI saved format) whose FaceDetailer node gives the parameters"
# The OpenAPI description of what :func:`read_detail_request` accepts (the route reads the body itself).
DETAIL_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "params": {"type": "string", "description": "JSON object of parameters"},
                        "workflow": {"type": "string", "description": _WORKFLOW_DOC + " (text or file)"},
                        "workflow_node": {"type": "string", "description": "FaceDetailer node id, if several"},
                    },
                    "required": ["image"],
                    "additionalProperties": {"type": "string"},
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "description": "base64 PNG/JPEG/WebP"},
                        "images": {"type": "array", "items": {"type": "string"}},
                        "params": FaceDetailerParams.model_json_schema(),
                        "workflow": {"type": "object", "description": _WORKFLOW_DOC},
                        "workflow_node": {"type": "string", "description": "FaceDetailer node id, if several"},
                    },
                }
            },
        },
        "required": True,
    }
}


async def read_detail_request(request: Request, limits: Limits) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The request's images and its parameter values (not yet validated)."""
    content_type = request.headers.get("content-type", "")
    declared = int(request.headers.get("content-length") or 0)
    budget = limits.max_upload_bytes * limits.max_batch_images + 1024 * 1024
    if declared > budget:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {budget} bytes")
    if content_type.startswith("multipart/form-data"):
        return await read_multipart(request, limits)
    if content_type.startswith("application/json"):
        return await read_json(request, limits)
    raise RequestError(415, "send multipart/form-data with an 'image' file, or JSON with a base64 'image'")


async def read_multipart(request: Request, limits: Limits) -> tuple[list[np.ndarray], dict[str, Any]]:
    try:
        form = await request.form(max_files=limits.max_batch_images + 1, max_fields=100)  # + a workflow file
    except Exception as error:
        raise RequestError(400, f"malformed multipart body: {error}") from error
    uploads = form.getlist("image")
    if not uploads:
        raise RequestError(422, "image: a file field named 'image' is required")
    images = []
    for index, upload in enumerate(uploads):
        if isinstance(upload, str):
            raise RequestError(422, "image: must be a file upload, not a text field")
        data = await upload.read(limits.max_upload_bytes + 1)
        images.append(decode_image(data, limits, f"image[{index}]" if len(uploads) > 1 else "image"))
    values: dict[str, Any] = {}
    if "params" in form:
        values.update(json_object(form["params"], "params"))
    for key, value in form.multi_items():
        if key == "workflow" and not isinstance(value, str):  # a workflow .json file uploaded as a file
            data = await value.read(MAX_WORKFLOW_BYTES + 1)
            if len(data) > MAX_WORKFLOW_BYTES:
                raise RequestError(413, f"workflow: larger than {MAX_WORKFLOW_BYTES} bytes")
            value = data.decode("utf-8", "replace")
        if key not in ("image", "params"):
            values[key] = value
    return images, values


async def read_json(request: Request, limits: Limits) -> tuple[list[np.ndarray], dict[str, Any]]:
    body = json_object((await request.body()).decode("utf-8", "replace"), "body")
    encoded = body.pop("images", None)
    if encoded is None:
        if "image" not in body:
            raise RequestError(422, "image: a base64-encoded image is required")
        encoded = [body.pop("image")]
    elif not isinstance(encoded, list) or not encoded:
        raise RequestError(422, "images: must be a non-empty list of base64 strings")
    if len(encoded) > limits.max_batch_images:
        raise RequestError(413, f"images: {len(encoded)} images exceeds the limit of {limits.max_batch_images}")
    images = [decode_base64_image(text, limits, f"images[{k}]") for k, text in enumerate(encoded)]
    values = body.pop("params", {}) or {}
    if not isinstance(values, dict):
        raise RequestError(422, "params: must be a JSON object")
    values.update(body)
    return images, values
