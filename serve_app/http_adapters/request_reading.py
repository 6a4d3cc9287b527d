"""Reading ``/v1/detail`` bodies: multipart (image files + fields) or JSON (base64 images + params).

Limits are checked before anything is decoded: the body's bytes as they arrive (with or without
a ``Content-Length``), the number of images, each image's bytes and pixels
(:mod:`serve_app.images`), and the JSON it carries — nesting, number of values and text of the
parameters and the workflow (:mod:`facedetailer.json_bounds`, :mod:`serve_app.limits`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import Request

from facedetailer.json_bounds import JsonLimitError, check_json, loads_bounded
from serve_app.config import Limits
from serve_app.http_adapters.errors import RequestError, json_limit_error, json_object
from serve_app.http_adapters.openapi import DETAIL_REQUEST_BODY
from serve_app.images import decode_base64_image, decode_image
from serve_app.limits import MAX_WORKFLOW_BYTES, max_params_chars

__all__ = ["DETAIL_REQUEST_BODY", "MAX_WORKFLOW_BYTES", "capped", "read_body", "read_detail_request"]

MULTIPART_OVERHEAD = 1024 * 1024  # headers and boundaries of a multipart body, beyond its contents


def declared_length(request: Request) -> int | None:
    """The request's ``Content-Length`` (None when absent; 400 when not a number)."""
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise RequestError(400, "Content-Length: not a number") from None
    if length < 0:
        raise RequestError(400, "Content-Length: negative")
    return length


def capped(request: Request, budget: int, what: str = "request body") -> Request:
    """``request`` whose body is refused (413) past ``budget`` bytes, declared or as it streams in."""
    declared = declared_length(request)
    if declared is not None and declared > budget:
        raise RequestError(413, f"{what} of {declared} bytes exceeds the limit of {budget} bytes")
    received = 0
    receive: Callable[[], Awaitable[dict[str, Any]]] = request.receive

    async def counting_receive() -> dict[str, Any]:
        nonlocal received
        message = await receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > budget:
                raise RequestError(413, f"{what} exceeds the limit of {budget} bytes")
        return message

    return Request(request.scope, counting_receive)


async def read_body(request: Request, budget: int, what: str = "request body") -> bytes:
    return await capped(request, budget, what).body()


async def read_detail_request(request: Request, limits: Limits) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The request's images and its parameter values (not yet validated)."""
    content_type = request.headers.get("content-type", "")
    # base64 images are 4/3 of their bytes; a workflow and the parameters come on top
    budget = limits.max_upload_bytes * limits.max_batch_images * 4 // 3 + MAX_WORKFLOW_BYTES + MULTIPART_OVERHEAD
    if content_type.startswith("multipart/form-data"):
        return await read_multipart(capped(request, budget), limits)
    if content_type.startswith("application/json"):
        return await read_json(capped(request, budget), limits)
    raise RequestError(415, "send multipart/form-data with an 'image' file, or JSON with a base64 'image'")


async def read_multipart(request: Request, limits: Limits) -> tuple[list[np.ndarray], dict[str, Any]]:
    try:
        # + a workflow file; a text field may be as long as a workflow, each checked below
        form = await request.form(
            max_files=limits.max_batch_images + 1, max_fields=100, max_part_size=MAX_WORKFLOW_BYTES
        )
    except RequestError:
        raise
    except Exception as error:  # the parser's message says what is malformed (no server detail in it)
        raise RequestError(400, f"malformed multipart body: {str(error)[:200]}") from error
    try:
        return await _form_contents(form, limits)
    finally:
        await form.close()  # spooled uploads


async def _form_contents(form: Any, limits: Limits) -> tuple[list[np.ndarray], dict[str, Any]]:
    uploads = form.getlist("image")
    if not uploads:
        raise RequestError.for_field(422, "image", "a file field named 'image' is required")
    if len(uploads) > limits.max_batch_images:
        raise RequestError(413, f"image: {len(uploads)} images exceeds the limit of {limits.max_batch_images}")
    images = []
    for index, upload in enumerate(uploads):
        if isinstance(upload, str):
            raise RequestError.for_field(422, "image", "must be a file upload, not a text field")
        data = await upload.read(limits.max_upload_bytes + 1)
        images.append(decode_image(data, limits, f"image[{index}]" if len(uploads) > 1 else "image"))
    for key in form:
        if key != "image" and len(form.getlist(key)) > 1:
            raise RequestError.for_field(422, key, "given more than once")
    return images, await form_parameters(form, "image", limits)


async def form_parameters(form: Any, upload_field: str, limits: Limits) -> dict[str, Any]:
    """A multipart request's parameters: the ``params`` JSON, then every other text field (a
    ``workflow`` may come as a file), checked against the limits; ``upload_field`` is the media."""
    values: dict[str, Any] = {}
    if "params" in form:
        values.update(json_object(form["params"], "params", max_bytes=max_params_chars(limits)))
    for key, value in form.multi_items():
        if key in (upload_field, "params"):
            continue
        if key == "workflow" and not isinstance(value, str):  # a workflow .json file uploaded as a file
            data = await value.read(MAX_WORKFLOW_BYTES + 1)
            if len(data) > MAX_WORKFLOW_BYTES:
                raise RequestError(413, f"workflow: larger than {MAX_WORKFLOW_BYTES} bytes")
            value = data.decode("utf-8", "replace")
        elif not isinstance(value, str):
            raise RequestError.for_field(422, key, "must be a text field, not a file")
        values[key] = value
    check_parameters(values, limits)
    return values


async def read_json(request: Request, limits: Limits) -> tuple[list[np.ndarray], dict[str, Any]]:
    try:
        body = loads_bounded(await request.body(), "body")
    except JsonLimitError as error:
        raise json_limit_error(error) from error
    except ValueError as error:
        raise RequestError(422, str(error), [{"field": "body", "message": str(error).removeprefix("body: ")}]) from None
    if not isinstance(body, dict):
        raise RequestError.for_field(422, "body", "must be a JSON object")
    for key in ("workflow", "workflow_node"):  # null: not given, as for every optional parameter
        if key in body and body[key] is None:
            del body[key]
    encoded = body.pop("images", None)
    if encoded is None:
        if "image" not in body:
            raise RequestError.for_field(422, "image", "a base64-encoded image is required")
        encoded = [body.pop("image")]
    elif not isinstance(encoded, list) or not encoded:
        raise RequestError.for_field(422, "images", "must be a non-empty list of base64 strings")
    if len(encoded) > limits.max_batch_images:
        raise RequestError(413, f"images: {len(encoded)} images exceeds the limit of {limits.max_batch_images}")
    images = [decode_base64_image(text, limits, f"images[{k}]") for k, text in enumerate(encoded)]
    values = body.pop("params", None)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RequestError.for_field(422, "params", "must be a JSON object")
    values.update(body)
    check_parameters(values, limits)
    return images, values


def check_parameters(values: dict[str, Any], limits: Limits) -> None:
    """The parameters' text within :func:`serve_app.limits.max_params_chars` (a workflow and a
    control image have their own bounds: :data:`MAX_WORKFLOW_BYTES`, ``max_upload_bytes``)."""
    rest = {key: value for key, value in values.items() if key != "workflow"}
    control = rest.get("controlnet")
    if isinstance(control, dict) and "control_image" in control:
        rest["controlnet"] = {key: value for key, value in control.items() if key != "control_image"}
    try:
        check_json(rest, "params", max_characters=max_params_chars(limits))
        if "workflow" in values and not isinstance(values["workflow"], str):  # text is bounded when parsed
            check_json(values["workflow"], "workflow", max_characters=MAX_WORKFLOW_BYTES)
        elif isinstance(values.get("workflow"), str) and len(values["workflow"]) > MAX_WORKFLOW_BYTES:
            raise RequestError(413, f"workflow: larger than {MAX_WORKFLOW_BYTES} bytes")
    except JsonLimitError as error:
        raise json_limit_error(error) from error
