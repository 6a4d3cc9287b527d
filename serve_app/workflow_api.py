"""``POST /v1/workflow/import``: the parameters a ComfyUI workflow gives, without running anything.

The web page uses it to fill its form from a workflow file; ``POST /v1/detail`` reads the same
``workflow``/``workflow_node`` fields itself (:func:`serve_app.http_adapters.errors.parse_params`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from facedetailer.json_bounds import JsonLimitError
from facedetailer.params import FaceDetailerParams
from facedetailer.workflow import WorkflowError, import_workflow
from serve_app.auth import DETAIL_UNMETERED
from serve_app.http_adapters.errors import RequestError, json_limit_error, json_object, validation_error, workflow_error
from serve_app.http_adapters.openapi import WORKFLOW_IMPORT_BODY, WorkflowImportJson, error_responses, json_response
from serve_app.http_adapters.request_reading import read_body
from serve_app.limits import MAX_WORKFLOW_BYTES

workflow_router = APIRouter()
BODY_OVERHEAD = 64 * 1024  # the body's own keys around the workflow


@workflow_router.post(
    "/v1/workflow/import",
    operation_id="workflow_import",
    dependencies=[Depends(DETAIL_UNMETERED)],  # the detail scope
    openapi_extra=WORKFLOW_IMPORT_BODY,
    responses={
        **json_response(
            WorkflowImportJson,
            "The node's parameters, its id, title and the workflow's format.",
            links={  # the web page's flow: import a workflow, then detail with its parameters
                "DetailWithTheseParams": {"operationId": "detail", "requestBody": {"params": "$response.body#/params"}}
            },
        ),
        **error_responses(400, 413, 422, 500),
    },
)
async def workflow_import(request: Request) -> JSONResponse:
    """The parameters a ComfyUI workflow's FaceDetailer node gives (JSON ``{"workflow", "workflow_node"}``)."""
    body = json_object(await read_body(request, MAX_WORKFLOW_BYTES + BODY_OVERHEAD, "body"), "body")
    if "workflow" not in body:
        raise RequestError.for_field(422, "workflow", "a ComfyUI workflow (API or UI format) is required")
    node = body.get("workflow_node")
    if node is not None and not isinstance(node, str | int):
        raise RequestError.for_field(422, "workflow_node", "must be a node id (text or a number)")
    try:
        imported = import_workflow(body["workflow"], None if node in (None, "") else node)
    except WorkflowError as error:
        raise workflow_error(error) from error
    except JsonLimitError as error:
        raise json_limit_error(error) from error
    try:
        params = FaceDetailerParams.model_validate(imported.params)
    except ValidationError as error:
        raise validation_error(error) from error
    content: dict[str, Any] = {
        "params": params.model_dump(include=set(imported.params)),
        "node_id": imported.node_id,
        "node_title": imported.node_title,
        "format": imported.format,
        "models": {name: vars(source) for name, source in imported.models.items()},
    }
    return JSONResponse(content)
