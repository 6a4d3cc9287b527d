"""The gate at the HTTP edge: FastAPI dependencies per scope, the error responses, the OpenAPI security.

A protected route declares ``caller: Caller | None = Depends(DETAIL)`` (or lists the dependency):
with auth off it gets None and nothing changes; with auth on the dependency answers 401/403/429
before the route runs (before the body is read). The gate is the ingress replica's own
(``serve.get_replica_context().servable_object.auth``), so plain-function routes (the workflow
import router) are protected the same way as the ingress' methods.

The OpenAPI schema says what the replica does: with auth on, a bearer security scheme, each
protected operation's scope (OpenAPI 3.1 lists it as the requirement's role) and its 401/403
answers; with auth off, none of it. (No ``from __future__ import annotations`` here: the
dependency is a closure that Ray pickles by value, and FastAPI must find ``Request`` in its
annotations, not a string naming it.)
"""

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve_app.auth.gate import AuthGate, Caller
from serve_app.http_adapters.encoding import error_response
from serve_app.http_adapters.errors import RequestError

SECURITY_SCHEME = "ApiKey"
_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name=SECURITY_SCHEME,
    bearerFormat="API key",
    description="An API key of the service's config (docs/auth.md), sent as `Authorization: Bearer <key>`.",
)
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "what is wrong"},
        "details": {"type": "array", "items": {"type": "object"}},
    },
    "required": ["error"],
}
_ERROR_CONTENT = {"application/json": {"schema": ERROR_SCHEMA}}
_WWW_AUTHENTICATE = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer, and why (RFC 6750)"}}
RETRY_AFTER_HEADER = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds to wait before retrying"}}
AUTH_RESPONSES: dict[str, dict[str, Any]] = {
    "401": {"description": "No API key, or not a valid one", "headers": _WWW_AUTHENTICATE, "content": _ERROR_CONTENT},
    "403": {"description": "The API key lacks this route's scope", "headers": _WWW_AUTHENTICATE,
            "content": _ERROR_CONTENT},  # fmt: skip
}
# Routes that start model work: also 429 (the key's quotas, or the replica's max_inflight_requests).
BUSY_RESPONSES: dict[int | str, dict[str, Any]] = {
    429: {
        "description": "Over a quota of the API key or the replica's in-flight limit: retry after Retry-After",
        "headers": RETRY_AFTER_HEADER,
        "content": _ERROR_CONTENT,
    }
}


def current_gate() -> AuthGate | None:
    """The running ingress replica's gate (None: auth is off, or not inside a Serve replica)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        context = serve.get_replica_context()
    except RayServeException:  # not in a replica (e.g. the FastAPI app under a test client): no config, no auth
        return None
    if context.servable_object is None:  # still starting: it serves nothing yet
        raise RequestError(503, "the service is starting; retry")
    return context.servable_object.auth  # every ingress sets it: a missing one must fail, not open the door


def require_scope(scope: str, *, metered: bool = False) -> Callable[..., Any]:
    """A dependency: the :class:`Caller` holding ``scope`` (None with auth off); ``metered`` counts a
    detail request against the key's requests per minute (and refuses it when no crop or unit is left)."""

    async def caller_with_scope(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Security(_BEARER, scopes=[scope]),  # documents it
    ) -> Caller | None:
        gate = current_gate()
        if gate is None:
            return None
        caller = gate.authenticate(request.headers.get("authorization"), scope)
        if metered:
            await gate.admit(caller)
        return caller

    caller_with_scope.__name__ = f"caller_with_{scope}_scope"
    return caller_with_scope


DETAIL = require_scope("detail", metered=True)  # /v1/detail, /v1/detail/stream
DETAIL_UNMETERED = require_scope("detail")  # /v1/workflow/import
ADMIN = require_scope("admin")  # /v1/stats


async def _handle_request_error(request: Request, error: Exception) -> JSONResponse:
    """A :class:`RequestError` raised by a dependency (the gate's): the service's error shape and headers."""
    assert isinstance(error, RequestError)
    return error_response(error)


def document_auth(schema: dict[str, Any], enabled: bool) -> dict[str, Any]:
    """Adjust the generated schema to the replica: keep the security (and add 401/403) or drop it."""
    components = schema.setdefault("components", {})
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or "security" not in operation:
                continue
            if enabled:
                responses = operation.setdefault("responses", {})
                for status, response in AUTH_RESPONSES.items():
                    responses.setdefault(status, response)
            else:
                del operation["security"]
    if not enabled:
        schemes = components.get("securitySchemes", {})
        schemes.pop(SECURITY_SCHEME, None)
        if not schemes:
            components.pop("securitySchemes", None)
    return schema


def install_auth(app: FastAPI) -> None:
    """Errors raised by dependencies in the service's error shape; the OpenAPI schema as the replica is."""
    app.add_exception_handler(RequestError, _handle_request_error)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_auth(generate(), enabled=current_gate() is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
