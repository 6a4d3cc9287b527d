"""Client errors with their HTTP status, and request parameters parsed into the node's model."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from facedetailer.json_bounds import JsonLimitError, loads_bounded
from facedetailer.params import FaceDetailerParams
from facedetailer.safe_paths import UnsafeNameError
from facedetailer.workflow import WorkflowError, import_workflow

# the names an error message may start with ("<field>: …") that become a ``details`` entry's field
_PARAMETER_FIELDS = frozenset(FaceDetailerParams.model_fields) | {"workflow", "workflow_node", "image", "images"}


class RequestError(Exception):
    """A client error with its HTTP status and a message that says what is wrong.

    ``details`` is the list of ``{"field", "message", …}`` the error body carries (empty when
    the error names no input); ``headers`` are added to the response (e.g. ``Retry-After``,
    ``WWW-Authenticate``).
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

    @classmethod
    def for_message(cls, status_code: int, message: str) -> RequestError:
        """An error whose message may start with the input it is about (``"controlnet.name: …"``):
        that input becomes its ``details`` entry, so the web page marks the field."""
        head, separator, rest = message.partition(": ")
        field = head.split(" ", 1)[0]
        if separator and field.split(".", 1)[0].split("[", 1)[0] in _PARAMETER_FIELDS:
            return cls(status_code, message, [{"field": field, "message": rest}])
        return cls(status_code, message)

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


def json_limit_error(error: JsonLimitError) -> RequestError:
    """JSON nested too deep or too large (:mod:`facedetailer.json_bounds`): 422 naming the field and bound."""
    facts = {"limit": error.bound, "limit_value": error.limit_value, "requested": error.requested}
    return RequestError(422, str(error), [{"field": error.field, "message": str(error), **facts}])


def unsafe_name_error(error: UnsafeNameError) -> RequestError:
    """A LoRA or wildcard name that would leave its folder: 422 with the name and why (no field:
    the name came from a prompt or a wildcard)."""
    message = f"{error.kind} name {error.name!r} is refused: {error.reason}"
    return RequestError(422, message, [{"message": message, "name": error.name, "reason": error.reason}])


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
        except JsonLimitError as error:
            raise json_limit_error(error) from error
        values = {**imported.params, **values}
    elif node not in (None, ""):
        raise RequestError.for_field(422, "workflow_node", "given without a workflow")
    try:
        return FaceDetailerParams.model_validate(values)
    except ValidationError as error:
        raise validation_error(error) from error


def json_object(text: Any, name: str, max_bytes: int | None = None) -> dict[str, Any]:
    """A JSON object from text, within the JSON bounds (422 naming ``name`` otherwise)."""
    if not isinstance(text, str | bytes):
        raise RequestError.for_field(422, name, "must be JSON text")
    try:
        value = loads_bounded(text, name, max_bytes=max_bytes)
    except JsonLimitError as error:
        raise json_limit_error(error) from error
    except ValueError as error:  # "<name>: not valid JSON: …"
        message = str(error)
        raise RequestError(422, message, [{"field": name, "message": message.removeprefix(f"{name}: ")}]) from None
    if not isinstance(value, dict):
        raise RequestError.for_field(422, name, "must be a JSON object")
    return value
