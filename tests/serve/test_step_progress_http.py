"""Sampler steps and latent previews through the served graph: the inpainter replica streams them
to the ingress (a Ray Serve streaming handle call), which sends them over ``/v1/detail/stream``
and ``detail_with_progress``; a client that leaves the stream takes its crops out of the engine.
"""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.testing import assets

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

FAST = {"steps": 3, "guide_size": 128, "max_size": 256, "seed": 4}
LONG = {"steps": 100, "guide_size": 384, "max_size": 512, "seed": 2}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def stream_events(url: str, data: dict, photo: np.ndarray) -> list[tuple[str, dict]]:
    files = {"image": ("photo.png", png(photo), "image/png")}
    events = []
    with httpx.Client(timeout=600, trust_env=False) as http:
        with http.stream("POST", f"{url}/v1/detail/stream", files=files, data=data) as answer:
            assert answer.status_code == 200, answer.read()
            name = None
            for line in answer.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
    return events


def engine_stats(http: httpx.Client) -> dict:
    return http.get("/v1/stats", timeout=60).json()["inpainter"]


def test_the_stream_sends_the_plan_each_step_with_previews_then_faces_and_the_result(serve_instance):
    photo = assets.zidane()  # two faces, sampled together
    events = stream_events(serve_instance["url"], {"params": json.dumps(FAST), "preview_every": "1"}, photo)
    names = [name for name, _ in events]
    assert names[0] == "plan" and names[-1] == "result" and names.count("face") == 2
    plan = events[0][1]["faces"]
    result = events[-1][1]
    regions = {segment["index"]: segment["crop_region"] for segment in result["segments"][0]}
    assert sorted((face["index"], face["crop_region"]) for face in plan) == sorted(regions.items())
    for index, region in regions.items():
        steps = [data for name, data in events if name == "progress" and data["index"] == index]
        done = [step["done"] for step in steps]
        assert done == sorted(done) and done[-1] == FAST["steps"] and steps[-1]["total"] == FAST["steps"]
        assert all(step["crop_region"] == region for step in steps)
        finished = next(
            position for position, (name, data) in enumerate(events) if name == "face" and data["index"] == index
        )
        last_step = max(position for position, (name, data) in enumerate(events)
                        if name == "progress" and data["index"] == index)  # fmt: skip
        assert last_step < finished, "steps come before the face"
        # previews: JPEGs of one pixel per latent cell of the sampled crop
        size = next(face["sample_size"] for face in plan if face["index"] == index)
        for step in steps:
            preview = Image.open(io.BytesIO(base64.b64decode(step["preview"])))
            assert preview.format == "JPEG" and list(preview.size) == step["preview_size"]
            assert step["preview_size"] == [-(-size[0] // 8), -(-size[1] // 8)]
    assert any(data["request_eta_s"] is not None for name, data in events if name == "progress")
    # without previews the events carry none; with progress=false only faces
    quiet = stream_events(serve_instance["url"], {"params": json.dumps(FAST)}, photo)
    assert all("preview" not in data for name, data in quiet if name == "progress")
    assert any(name == "progress" for name, _ in quiet)
    bare = stream_events(serve_instance["url"], {"params": json.dumps(FAST), "progress": "false"}, photo)
    assert [name for name, _ in bare] == ["face", "face", "result"]
    assert bare[-1][1]["image"] == quiet[-1][1]["image"] == result["image"], "following changes nothing"


def test_stream_options_are_checked_before_the_stream_starts(serve_instance):
    files = {"image": ("photo.png", png(assets.zidane()), "image/png")}
    with httpx.Client(base_url=serve_instance["url"], timeout=60, trust_env=False) as http:
        refused = http.post("/v1/detail/stream", files=files, data={"preview_every": "-2"})
        assert refused.status_code == 422, refused.text
        assert [detail["field"] for detail in refused.json()["details"]] == ["preview_every"]
        plain = http.post("/v1/detail", files=files, data={"preview_every": "2"})
        assert plain.status_code == 422 and "preview_every" in plain.text, "a stream option only"


def test_the_handle_api_gets_the_same_events(serve_instance):
    handle = serve_instance["handle"]
    photo = assets.zidane()
    events = list(handle.options(stream=True).detail_with_progress.remote(photo, FAST, preview_every=2))
    names = [event["event"] for event in events]
    assert names[0] == "plan" and names[-1] == "result" and names.count("face") == 2
    steps = [event for event in events if event["event"] == "progress"]
    assert {event["step"] for event in steps if "preview" in event} <= {2, 3}  # every 2nd step and the last
    assert {event["index"] for event in steps if event["step"] == FAST["steps"]} == {0, 1}
    assert events[-1]["result"].images[0].shape == photo.shape


def test_a_client_that_leaves_the_stream_takes_its_crops_out_of_the_engine(serve_instance):
    """The page's Cancel: the browser aborts the stream after the first steps; the work stops."""
    url = serve_instance["url"]
    photo = np.asarray(Image.fromarray(assets.astronaut()).resize((256, 256), Image.Resampling.LANCZOS))
    files = {"image": ("face.png", png(photo), "image/png")}
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
        before = engine_stats(http)
        with http.stream("POST", "/v1/detail/stream", files=files, data={"params": json.dumps(LONG)}) as answer:
            for line in answer.iter_lines():
                if line == "event: progress":
                    break  # the inpainter is sampling: leave
        left = time.monotonic()
        stats = engine_stats(http)
        while time.monotonic() - left < 60 and (
            stats["crops_cancelled"] == before["crops_cancelled"] or stats["active_crops"]
        ):
            time.sleep(0.25)
            stats = engine_stats(http)
    assert stats["crops_cancelled"] == before["crops_cancelled"] + 1, "the crop left the engine"
    assert stats["active_crops"] == 0 and stats["crops_completed"] == before["crops_completed"]
    evaluations = stats["unet_crop_evaluations"] - before["unet_crop_evaluations"]
    assert evaluations < LONG["steps"], f"the crop ran {evaluations} of {LONG['steps']} steps"
    print(f"\ncrop left the engine {time.monotonic() - left:.2f} s after the client, after {evaluations} steps")
