"""Overload, timeouts and lost replicas at the ingress, composed in Serve's local testing mode (no Ray cluster).

A full inpainter queue is a 503 with Retry-After; ``limits.request_timeout_s`` is a 504 that also
cancels the model calls in flight (the real-Ray chain down to the engine is in test_cancellation.py);
a model call whose replica dies is sent again, and a request whose lost call finds no replica
before its deadline is a 503 with Retry-After (real replica deaths: test_replica_loss.py).
One app serves both cases: FastAPI's app object can be bound only once per process in local mode.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from ray import serve
from ray.exceptions import ActorDiedError

from deployments.inpainter_engine import EngineBusyError
from facedetailer.segs import Detection
from serve_app.http_adapters.encoding import error_response
from serve_app.ingress import FaceDetailerIngress, RequestError
from tests.serve.frozen_app import kept_as_frozen

EVENTS: list[str] = []  # the stubs run in this process (local testing mode)
SLOW_MARK = 255  # an image whose first pixel is this makes the detector take 30 s
LOST_ONCE_MARK = 254  # the detector's replica "dies" on the first call for this image, then answers
LOST_THEN_STUCK_MARK = 253  # it dies, then no replica answers (nothing can be placed)


@serve.deployment
class OneFaceDetector:
    async def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        mark = int(image[0, 0, 0])
        if mark in (LOST_ONCE_MARK, LOST_THEN_STUCK_MARK):
            EVENTS.append("detect")
            if EVENTS.count("detect") == 1:
                raise ActorDiedError()
            if mark == LOST_THEN_STUCK_MARK:
                await asyncio.sleep(30)
        if image[0, 0, 0] == SLOW_MARK:
            EVENTS.append("detect started")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                EVENTS.append("detect cancelled")
                raise
        return [Detection("face", (40.0, 40.0, 90.0, 90.0), 0.9)]


@serve.deployment
class RecordingSam:
    def predict(self, image: np.ndarray, prompts: list) -> list:
        EVENTS.append("sam")
        return []


@serve.deployment
class FullInpainter:
    """An inpainter whose engine queue is full."""

    def supported_samplers(self) -> list[str]:
        return ["euler"]

    def supported_schedulers(self) -> list[str]:
        return ["normal"]

    async def refine(self, jobs: list, settings: object) -> None:
        EVENTS.append("refine")
        raise EngineBusyError("inpainter queue is full (64 crops waiting, limit 64); retry later")


@pytest.fixture(scope="module")
def handle():
    app = FaceDetailerIngress.bind(
        OneFaceDetector.bind(), FullInpainter.bind(), sam=RecordingSam.bind(), limits={"request_timeout_s": 1.0}
    )
    with kept_as_frozen():  # local testing mode binds Serve's handlers to this process's app copy
        yield serve.run(app, name="overload", route_prefix=None, _local_testing_mode=True)


def image(first_pixel: int) -> np.ndarray:
    array = np.random.default_rng(0).integers(0, 200, (160, 160, 3), dtype=np.uint8)
    array[0, 0, 0] = first_pixel
    return array


def test_a_full_inpainter_queue_is_a_503_with_retry_after(handle):
    with pytest.raises(RequestError) as raised:
        handle.detail.remote(image(0), {"steps": 2, "guide_size": 128, "max_size": 256}).result(timeout_s=60)
    assert raised.value.status_code == 503 and "queue is full" in raised.value.message
    response = error_response(raised.value)
    assert response.status_code == 503 and response.headers["retry-after"]


def test_request_timeout_is_a_504_and_cancels_the_model_call_in_flight(handle):
    """``limits.request_timeout_s``: the detector call running is cancelled, SAM and the inpainter never start."""
    EVENTS.clear()
    started = time.perf_counter()
    with pytest.raises(RequestError) as raised:
        handle.detail.remote(image(SLOW_MARK), {"steps": 2, "use_sam": True}).result(timeout_s=60)
    assert raised.value.status_code == 504 and "longer than 1.0 s" in raised.value.message
    assert time.perf_counter() - started < 5
    deadline = time.monotonic() + 5
    while "detect cancelled" not in EVENTS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert EVENTS == ["detect started", "detect cancelled"]


def test_a_call_whose_replica_died_is_sent_again(handle):
    """The detector "dies" once; its call is sent again and the request goes on (to the full inpainter)."""
    EVENTS.clear()
    with pytest.raises(RequestError) as raised:
        handle.detail.remote(image(LOST_ONCE_MARK), {"steps": 2, "guide_size": 128, "max_size": 256}).result(
            timeout_s=60
        )
    assert EVENTS == ["detect", "detect", "refine"]
    assert raised.value.status_code == 503 and "queue is full" in raised.value.message


def test_no_replica_before_the_deadline_after_a_loss_is_a_503_with_retry_after(handle):
    """Not the request's fault, unlike a slow request (504): the caller is told to retry."""
    EVENTS.clear()
    with pytest.raises(RequestError) as raised:
        handle.detail.remote(image(LOST_THEN_STUCK_MARK), {"steps": 2}).result(timeout_s=60)
    assert EVENTS == ["detect", "detect"]
    assert raised.value.status_code == 503 and "no live detector replica" in raised.value.message
    assert error_response(raised.value).headers["retry-after"]
