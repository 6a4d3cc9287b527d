"""A request id for every HTTP request: in its error body, its ``X-Request-ID`` header and the log.

Behind Ray Serve the id is Serve's own: its proxy takes the client's ``X-Request-ID`` (or makes
one), passes it to the replica in the request's headers, logs it on the replica's access line and
sends it back as the response's ``X-Request-ID``. :class:`RequestIdMiddleware` reads that id
(or makes one when the app runs without Serve, and then sends the header itself), keeps it in a
context variable for error bodies and log lines, and turns an exception that escaped every
handler into the service's JSON 500 — never a stack trace or a bare text page.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_KEY = REQUEST_ID_HEADER.lower().encode("latin-1")
_ACCEPTED_ID = re.compile(r"[\x21-\x7e]{1,200}")  # printable ASCII, no spaces: safe in a log line and a header

_current: ContextVar[str | None] = ContextVar("facedetailer_request_id", default=None)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def current_request_id() -> str | None:
    """The id of the HTTP request being handled (None outside one, e.g. a handle call)."""
    return _current.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


def _behind_serve() -> bool:
    """Inside a Ray Serve replica, whose proxy adds ``X-Request-ID`` to every response itself."""
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:  # outside a replica (tests running the app in-process), or Serve missing
        return False
    return True


class RequestIdMiddleware:
    """Pure ASGI middleware (streams pass through untouched); see the module docstring.

    ``on_unhandled(error)`` builds the response for an exception nothing else handled; it is
    sent when the response has not started (otherwise the connection is just closed).
    """

    def __init__(self, app: ASGIApp, on_unhandled: Callable[[BaseException], Any]) -> None:
        self.app = app
        self.on_unhandled = on_unhandled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # asked per request, not kept: the app object (and this middleware) may be built in one
        # process and pickled into a Serve replica
        adds_header = not _behind_serve()
        given = next((value for key, value in scope.get("headers", []) if key == _HEADER_KEY), b"")
        text = given.decode("latin-1")
        request_id = text if _ACCEPTED_ID.fullmatch(text) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = _current.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if adds_header:
                    headers = [(key, value) for key, value in message.get("headers", []) if key != _HEADER_KEY]
                    message["headers"] = [*headers, (_HEADER_KEY, request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            if started:  # a stream that broke after its first bytes: nothing more can be said
                logger.exception("request %s: failed after the response started", request_id)
                return
            response = self.on_unhandled(error)
            await response(scope, receive, send_with_id)
        finally:
            _current.reset(token)
