"""``POST /v1/workflow/import``: the parameters a ComfyUI workflow gives, without running anything.

The web page uses it to fill its form from a workflow file; ``POST /v1/detail`` reads the same
``workflow``/``workflow_node`` fields itself (:func:`serve_app.http_adapters.errors.parse_params`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from facedetailer.params import FaceDetailerParams
from facedetailer.workflow import WorkflowError, import_workflow
from serve_app.auth import DETAIL_UNMETERED
from serve_app.http_adapters.encoding import error_response
from serve_app.http_adapters.errors import RequestError, json_object, validation_error, workflow_error
from serve_app.http_adapters.request_reading import MAX_WORKFLOW_BYTES

workflow_router = APIRouter()


@workflow_router.post("/v1/workflow/import", dependencies=[Depends(DETAIL_UNMETERED)])  # the detail scope
async def workflow_import(request: Request) -> JSONResponse:
    """The parameters a ComfyUI workflow's FaceDetailer node gives (JSON ``{"workflow", "workflow_node"}``)."""
    try:
        if int(request.headers.get("content-length") or 0) > MAX_WORKFLOW_BYTES:
            raise RequestError(413, f"body: larger than {MAX_WORKFLOW_BYTES} bytes")
        body = json_object((await request.body()).decode("utf-8", "replace"), "body")
        if "workflow" not in body:
            raise RequestError.for_field(422, "workflow", "a ComfyUI workflow (API or UI format) is required")
        node = body.get("workflow_node")
        try:
            imported = import_workflow(body["workflow"], None if node in (None, "") else node)
        except WorkflowError as error:
            raise workflow_error(error) from error
        try:
            params = FaceDetailerParams.model_validate(imported.params)
        except ValidationError as error:
            raise validation_error(error) from error
    except RequestError as error:
        return error_response(error)
    content: dict[str, Any] = {
        "params": params.model_dump(include=set(imported.params)),
        "node_id": imported.node_id,
        "node_title": imported.node_title,
        "format": imported.format,
        "models": {name: vars(source) for name, source in imported.models.items()},
    }
    return JSONResponse(content)
