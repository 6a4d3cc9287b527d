"""Progress events without Ray: order, errors after faces, heartbeats, cancellation, SSE encoding."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve_app.pipeline import SegmentReport
from serve_app.streaming import face_event, progress_events, sse, with_progress


def report(index: int, skipped: bool = False) -> SegmentReport:
    face = SegmentReport(index=index, bbox=(1, 2, 3, 4), crop_region=(0, 0, 8, 8), confidence=0.9, label="face")
    face.seed, face.skipped, face.skip_reason = 10 + index, skipped, "empty mask" if skipped else None
    return face


async def collect(run, heartbeat_s=None):
    return [event async for event in with_progress(run, heartbeat_s)]


def test_faces_in_order_then_the_result():
    async def run(emit):
        emit(face_event(report(0)))
        await asyncio.sleep(0.01)
        emit(face_event(report(1, skipped=True)))
        return "RESULT"

    events = asyncio.run(collect(run))
    assert [event["event"] for event in events] == ["face", "face", "result"]
    assert events[0]["status"] == "refined" and events[0]["seed"] == 10 and events[0]["bbox"] == [1, 2, 3, 4]
    assert events[1]["status"] == "empty mask" and events[1]["skipped"]
    assert events[2]["result"] == "RESULT"


def test_an_error_comes_after_the_faces_already_finished():
    async def run(emit):
        emit(face_event(report(0)))
        raise ValueError("inpainter failed")

    async def scenario():
        seen = []
        with pytest.raises(ValueError, match="inpainter failed"):
            async for event in with_progress(run):
                seen.append(event["event"])
        return seen

    assert asyncio.run(scenario()) == ["face"]


def test_heartbeats_while_nothing_happens():
    async def run(emit):
        await asyncio.sleep(0.2)
        return "done"

    events = asyncio.run(collect(run, heartbeat_s=0.03))
    assert events[-1]["event"] == "result"
    assert 2 <= sum(event["event"] == "heartbeat" for event in events) <= 8


def test_closing_the_stream_cancels_the_work():
    cancelled = asyncio.Event()

    async def run(emit):
        emit(face_event(report(0)))
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario():
        stream = with_progress(run)
        first = await stream.__anext__()
        await stream.aclose()  # the HTTP client went away
        await asyncio.wait_for(cancelled.wait(), 2)
        return first

    assert asyncio.run(scenario())["event"] == "face"


def test_sse_frames():
    frame = sse("face", {"index": 0, "seed": 2**64 - 1})
    assert frame.endswith(b"\n\n") and frame.count(b"\n") == 3
    name, data = frame.decode().strip().split("\n")
    assert name == "event: face" and json.loads(data.removeprefix("data: ")) == {"index": 0, "seed": 2**64 - 1}


def test_progress_events_hand_the_request_a_listener_that_emits_into_the_stream():
    async def detail(progress):
        progress.face(report(0))
        return "RESULT"

    async def scenario():
        return [event async for event in progress_events(detail)]

    events = asyncio.run(scenario())
    assert [event["event"] for event in events] == ["face", "result"] and events[0]["seed"] == 10
