"""Client errors with their HTTP status, and request parameters parsed into the node's model."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from facedetailer.params import FaceDetailerParams
from facedetailer.workflow import WorkflowError, import_workflow


class RequestError(Exception):
    """A client error with its HTTP status and a message that says what is wrong.

    ``headers`` go on the response (``WWW-Authenticate``, a computed ``Retry-After``).
    """

    def __init__(
        self, status_code: int, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.details = details
        self.headers = dict(headers or {})

    @classmethod
    def for_field(cls, status_code: int, field: str, message: str) -> RequestError:
        """An error about one named input: ``"<field>: <message>"``, with ``details`` naming the field."""
        return cls(status_code, f"{field}: {message}", [{"field": field, "message": message}])

    def __reduce__(self) -> tuple[Any, ...]:
        """Keep every field when Ray sends the error back to a handle caller."""
        return (type(self), (self.status_code, self.message, self.details, self.headers))


def validation_error(error: ValidationError) -> RequestError:
    details = [
        {"field": ".".join(str(part) for part in item["loc"]) or "params", "message": item["msg"]}
        for item in error.errors(include_url=False)
    ]
    summary = "; ".join(f"{item['field']}: {item['message']}" for item in details)
    return RequestError(422, f"invalid parameters: {summary}", details)


def workflow_error(error: WorkflowError) -> RequestError:
    """A workflow that cannot be imported: 422 naming the field (``workflow``, ``workflow_node``, …)."""
    message = str(error)
    detail = message.removeprefix(f"{error.field}: ")
    return RequestError(422, message, [{"field": error.field, "message": detail}])


def parse_params(values: dict[str, Any] | FaceDetailerParams | None) -> FaceDetailerParams:
    """Validate the request's values; a ``workflow`` supplies them, and explicit values override it."""
    if isinstance(values, FaceDetailerParams):
        return values
    values = dict(values or {})
    workflow, node = values.pop("workflow", None), values.pop("workflow_node", None)
    if workflow is not None:
        try:
            imported = import_workflow(workflow, None if node in (None, "") else node)
        except WorkflowError as error:
            raise workflow_error(error) from error
        values = {**imported.params, **values}
    elif node not in (None, ""):
        raise RequestError.for_field(422, "workflow_node", "given without a workflow")
    try:
        return FaceDetailerParams.model_validate(values)
    except ValidationError as error:
        raise validation_error(error) from error


def json_object(text: Any, name: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as error:
        raise RequestError(422, f"{name}: not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise RequestError(422, f"{name}: must be a JSON object")
    return value
