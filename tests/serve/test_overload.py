"""A full inpainter queue is a 503 with Retry-After, composed in Serve's local testing mode (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from ray import serve

from deployments.inpainter_engine import EngineBusyError
from facedetailer.segs import Detection
from serve_app.http_adapters.encoding import error_response
from serve_app.ingress import FaceDetailerIngress, RequestError


@serve.deployment
class OneFaceDetector:
    def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        return [Detection("face", (40.0, 40.0, 90.0, 90.0), 0.9)]


@serve.deployment
class FullInpainter:
    """An inpainter whose engine queue is full."""

    def supported_samplers(self) -> list[str]:
        return ["euler"]

    def supported_schedulers(self) -> list[str]:
        return ["normal"]

    async def refine(self, jobs: list, settings: object) -> None:
        raise EngineBusyError("inpainter queue is full (64 crops waiting, limit 64); retry later")


def test_a_full_inpainter_queue_is_a_503_with_retry_after():
    app = FaceDetailerIngress.bind(OneFaceDetector.bind(), FullInpainter.bind())
    handle = serve.run(app, name="overload", route_prefix=None, _local_testing_mode=True)
    image = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    with pytest.raises(RequestError) as raised:
        handle.detail.remote(image, {"steps": 2, "guide_size": 128, "max_size": 256}).result(timeout_s=60)
    assert raised.value.status_code == 503 and "queue is full" in raised.value.message
    response = error_response(raised.value)
    assert response.status_code == 503 and response.headers["retry-after"]
