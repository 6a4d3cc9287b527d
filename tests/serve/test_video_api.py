"""``/v1/detail/video`` in-process (the ingress's real app over stub deployments, no Ray): the one
error shape, bounds before any decoding, the stream's 4xx before it starts, and the metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.testclient import TestClient

from deployments.testing.video_clip import ClipSpec, encode_clip
from tests.serve.stub_app import _INSTANCES, ingress_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SMALL = {"steps": 2, "guide_size": 64, "max_size": 128, "seed": 4}
SPEC = ClipSpec(frames=3, width=64, height=48, audio=False)


class Tally:
    """A Prometheus metric's stand-in: what was counted and observed."""

    def __init__(self) -> None:
        self.total = 0.0
        self.stages: list[str] = []

    def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
        self.total += value

    def observe(self, value: float, tags: dict | None = None) -> None:
        self.stages.append((tags or {}).get("stage", ""))


@pytest.fixture(scope="module")
def served():
    with ingress_app({"max_steps": 50}) as (app, stubs):
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, _INSTANCES[-1]


@pytest.fixture(scope="module")
def clip() -> bytes:
    rng = np.random.default_rng(3)
    return encode_clip([rng.integers(0, 255, (SPEC.height, SPEC.width, 3), dtype=np.uint8) for _ in range(3)], SPEC)


def post(client: TestClient, data: bytes, fields: dict, route: str = "/v1/detail/video", **query):
    return client.post(route, params=query, files={"video": ("clip.mp4", data, "video/mp4")}, data=fields)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "status", "request_id", "details"} and body["status"] == status
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def test_a_video_is_counted_in_the_metrics(served, clip: bytes) -> None:
    client, ingress = served
    tallies = {name: Tally() for name in ("videos", "video_frames", "faces_refined", "stage_latency")}
    for name, tally in tallies.items():
        setattr(ingress.metrics, name, tally)
    response = post(client, clip, {"params": json.dumps(SMALL)}, format="json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["frames"] == 3 and body["faces_refined"] == 3  # the stub detector: one face per frame
    assert tallies["videos"].total == 1 and tallies["video_frames"].total == 3
    assert tallies["faces_refined"].total == 3
    assert {"video_decode", "video_detect", "video_encode", "video_total"} <= set(tallies["stage_latency"].stages)


def test_video_errors_have_the_one_error_shape(served, clip: bytes) -> None:
    client, _ = served
    not_video = error_of(post(client, b"\x00garbage" * 10, {"params": json.dumps(SMALL)}), 415)
    assert not_video["details"][0]["field"] == "video" and "Errno" not in not_video["error"]
    too_many_steps = error_of(post(client, clip, {"params": json.dumps({**SMALL, "steps": 80})}), 422)
    assert too_many_steps["details"][0]["limit"] == "limits.max_steps"
    deep = json.dumps(SMALL)[:-1] + ', "a": ' + "[" * 100 + "]" * 100 + "}"
    too_deep = error_of(post(client, clip, {"params": deep}), 422)
    assert too_deep["details"][0]["field"] == "params" and too_deep["details"][0]["limit"] == "max_json_depth"
    bad_option = error_of(post(client, clip, {"params": json.dumps(SMALL), "temporal": "sometimes"}), 422)
    assert bad_option["details"][0]["field"] == "temporal"
    bad_container = error_of(post(client, clip, {"params": json.dumps(SMALL)}, container="avi"), 422)
    assert bad_container["details"][0]["field"] == "container"
    twice = client.post("/v1/detail/video", files=[("video", ("a.mp4", clip, "video/mp4")),
                                                   ("video", ("b.mp4", clip, "video/mp4"))])  # fmt: skip
    assert error_of(twice, 422)["details"][0]["field"] == "video"
    not_multipart = client.post("/v1/detail/video", json={"video": "AAAA"})
    error_of(not_multipart, 415)


def test_the_stream_answers_what_it_can_judge_before_it_starts(served, clip: bytes) -> None:
    client, _ = served
    unknown = post(client, clip, {"params": json.dumps({**SMALL, "sampler_name": "nope"})}, "/v1/detail/video/stream")
    assert error_of(unknown, 422)["details"][0]["field"] == "sampler_name"
    with client.stream("POST", "/v1/detail/video/stream", files={"video": ("clip.mp4", b"not a video")},
                       data={"params": json.dumps(SMALL)}) as response:  # fmt: skip
        assert response.status_code == 200  # the file is judged once the work starts: an error event
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == "event: error"
    event = json.loads(lines[1].removeprefix("data: "))
    assert event["status"] == 415 and event["request_id"] and event["details"][0]["field"] == "video"
