"""Every exception a route can meet, as the service's one error shape (:mod:`.encoding`).

:func:`install_error_handling` puts it on the FastAPI app: FastAPI's own errors (unknown route
404, wrong method 405, a query value of the wrong type 422) and a route's :class:`RequestError`
are answered in the shape, and anything unexpected is a 500 whose body says only that, with the
request id; its traceback goes to the log under that id. A new kind of client error (e.g. an
auth module's 401/403/429) raises :class:`RequestError` with its status and headers, or
registers its exception type here.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from facedetailer.json_bounds import JsonLimitError
from facedetailer.safe_paths import UnsafeNameError
from serve_app.http_adapters.encoding import error_response
from serve_app.http_adapters.errors import RequestError, json_limit_error, unsafe_name_error
from serve_app.http_adapters.request_ids import RequestIdMiddleware, current_request_id
from serve_app.images import ImageInputError
from serve_app.limits import LimitExceededError

logger = logging.getLogger("ray.serve")

INTERNAL_ERROR = "internal error; the service log has the details under this request_id"


def request_error(error: BaseException) -> RequestError | None:
    """The client error an exception stands for, or None for a server fault."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, ImageInputError):
        return RequestError.for_message(error.status_code, str(error))
    if isinstance(error, LimitExceededError):
        return RequestError(422, str(error), error.details())
    if isinstance(error, JsonLimitError):
        return json_limit_error(error)
    if isinstance(error, UnsafeNameError):
        return unsafe_name_error(error)
    if isinstance(error, HTTPException):
        message = error.detail if isinstance(error.detail, str) else "request refused"
        return RequestError(error.status_code, message, headers=dict(error.headers or {}))
    if isinstance(error, RequestValidationError):
        details = [
            {"field": ".".join(str(part) for part in item["loc"] if part not in ("query", "path", "header", "body")),
             "message": item["msg"]}
            for item in error.errors()
        ]  # fmt: skip
        summary = "; ".join(f"{item['field']}: {item['message']}" for item in details)
        return RequestError(422, f"invalid request: {summary}", details)
    return None


def stream_error(error: BaseException, route: str) -> RequestError:
    """What a stream's ``error`` event says of an exception: the client error, or a 500 logged
    with its traceback (the stream has started: no error handler will see it)."""
    client_error = request_error(error)
    if client_error is None:
        logger.error("request failed in %s", route, exc_info=error)
        client_error = RequestError(500, INTERNAL_ERROR)
    return client_error


def response_for_exception(error: BaseException) -> JSONResponse:
    """A client error's response, or a logged 500 that tells nothing but the request id."""
    client_error = request_error(error)
    if client_error is not None:
        return error_response(client_error)
    logger.error("request %s: unexpected error", current_request_id(), exc_info=error)
    return error_response(RequestError(500, INTERNAL_ERROR))


async def _handle(request: Request, error: Exception) -> JSONResponse:
    return response_for_exception(error)


def install_error_handling(app: FastAPI) -> None:
    """Request ids and the error shape on every route of ``app`` (call before the app serves)."""
    app.add_middleware(RequestIdMiddleware, on_unhandled=response_for_exception)
    for kind in (HTTPException, RequestValidationError, RequestError, ImageInputError, LimitExceededError,
                 JsonLimitError, UnsafeNameError):  # fmt: skip
        app.add_exception_handler(kind, _handle)
