"""Progress while a request runs, as a stream of events, and their Server-Sent Events encoding.

The events (``plan``, ``progress``, ``face``, then ``result``; see :mod:`serve_app.progress`)
feed the handle API's ``detail_with_progress`` and HTTP's ``/v1/detail/stream`` (Server-Sent
Events, encoded by :func:`sse`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from serve_app.pipeline import DetailResult
from serve_app.progress import Emit, RequestProgress, StreamOptions, face_event

__all__ = ["face_event", "progress_events", "sse", "with_progress"]

HEARTBEAT_S = 10.0  # an SSE comment this often keeps proxies from closing a quiet stream
SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def with_progress(
    run: Callable[[Emit], Awaitable[Any]] | Callable[[Callable[..., None]], Awaitable[Any]],
    heartbeat_s: float | None = None,
    event_of: Callable[..., dict[str, Any]] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Run ``run(emit)`` and yield the events it emits as they happen, then ``{"event": "result"}``.

    With ``heartbeat_s``, a ``{"event": "heartbeat"}`` is yielded after that long without one.
    The run's error is raised after the faces it finished; closing the iterator cancels the run.
    ``event_of`` turns the callback's arguments into an event (a video's frames done in
    ``serve_app/http_adapters/video.py``); without it ``run`` emits the events themselves.
    """
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    convert = event_of
    emit = events.put_nowait if convert is None else lambda *args: events.put_nowait(convert(*args))
    task = asyncio.ensure_future(run(emit))
    getter: asyncio.Future | None = None
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, task}, timeout=heartbeat_s, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield getter.result()
                continue
            getter.cancel()
            if task.done():
                break
            yield {"event": "heartbeat"}
        while not events.empty():
            yield events.get_nowait()
        yield {"event": "result", "result": task.result()}
    finally:
        if getter is not None and not getter.done():
            getter.cancel()
        if not task.done():
            task.cancel()  # the client went away: stop the work


def progress_events(
    detail: Callable[[RequestProgress], Awaitable[DetailResult]],
    options: StreamOptions | None = None,
    heartbeat_s: float | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """``detail(progress)`` as events: the request's :class:`RequestProgress` reports to the stream."""
    return with_progress(lambda emit: detail(RequestProgress(emit, options)), heartbeat_s)


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Event (``data`` is JSON on one line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


SSE_HEARTBEAT = b": keep-alive\n\n"
