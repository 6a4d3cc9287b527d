"""Progress while a request runs: one ``face`` event per face as it completes, then the ``result``.

The same events feed the handle API's ``detail_with_progress`` and HTTP's ``/v1/detail/stream``
(Server-Sent Events, encoded by :func:`sse`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from serve_app.http_adapters.encoding import segment_json
from serve_app.pipeline import SegmentReport

HEARTBEAT_S = 10.0  # an SSE comment this often keeps proxies from closing a quiet stream
SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

OnFace = Callable[[SegmentReport], None]


def face_event(report: SegmentReport) -> dict[str, Any]:
    """A face finished: refined, or skipped and why (``status`` is "refined" or the skip reason)."""
    status = report.skip_reason if report.skipped else "refined"
    return {"event": "face", "image": report.image_index, "status": status, **segment_json(report)}


async def with_progress(
    run: Callable[[Callable[..., None]], Awaitable[Any]],
    heartbeat_s: float | None = None,
    event_of: Callable[..., dict[str, Any]] = face_event,
) -> AsyncIterator[dict[str, Any]]:
    """Run ``run(on_face)`` and yield its face events as they happen, then ``{"event": "result"}``.

    With ``heartbeat_s``, a ``{"event": "heartbeat"}`` is yielded after that long without one.
    The run's error is raised after the faces it finished; closing the iterator cancels the run.
    ``event_of`` turns the callback's arguments into an event (a face report by default; a
    video's frames done in ``serve_app/http_adapters/video.py``).
    """
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.ensure_future(run(lambda *args: events.put_nowait(event_of(*args))))
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
        if not task.done():
            task.cancel()  # the client went away: stop the work


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Event (``data`` is JSON on one line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


SSE_HEARTBEAT = b": keep-alive\n\n"
