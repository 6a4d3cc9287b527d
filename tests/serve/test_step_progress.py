"""Step progress from the pipeline to the events a stream carries (no Ray, no models).

The pipeline tells a listener every face it will sample (with its crop region) before the
inpainter starts, and maps each step the inpainter reports to its image and face, a black-patch
retry included; the listener's events carry steps over cycles, ETAs from the steps' rate and,
when asked, a JPEG preview. Without a listener the inpainter is called exactly as before.
"""

from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from PIL import Image

from deployments.step_progress import StepEvent
from facedetailer.params import FaceDetailerParams
from serve_app.pipeline import PlannedFace, SegmentReport, detail_batch
from serve_app.progress import RequestProgress, StreamOptions
from tests.serve.test_pipeline import FakeStages, Job, face, textured


@dataclass
class SteppingStages(FakeStages):
    """The fake inpainter reports ``steps`` steps of each crop (crop index = position in the call)."""

    steps: int = 3
    keywords: list[set[str]] = field(default_factory=list)
    black_first: bool = False

    async def refine(self, jobs: list[Job], settings: Any, **keywords: Any) -> list[np.ndarray]:
        self.keywords.append(set(keywords))
        on_progress = keywords.get("on_progress")
        if on_progress is not None:
            for step in range(1, self.steps + 1):
                for index in range(len(jobs)):
                    on_progress(StepEvent(index, 0, 1, step, self.steps))
        images = await super().refine(jobs, settings)
        if self.black_first and len(self.keywords) == 1:
            images = [np.zeros_like(image) for image in images]
        return images


@dataclass
class Listener:
    planned_faces: list[PlannedFace] = field(default_factory=list)
    steps: list[tuple[int, int, tuple[int, ...], int]] = field(default_factory=list)

    def planned(self, faces: list[PlannedFace]) -> None:
        self.planned_faces.extend(faces)

    def step(self, image_index: int, report: SegmentReport, event: Any) -> None:
        self.steps.append((image_index, report.index, report.crop_region, event.step))


def detail(images, stages, listener=None, **params):
    return asyncio.run(
        detail_batch(images, FaceDetailerParams(**params), stages, make_job=Job, settings=None, progress=listener)
    )


def test_the_listener_gets_the_plan_then_each_faces_steps_in_its_image():
    boxes = [face(20, 20, 60, 70), face(200, 20, 240, 70)]
    stages, listener = SteppingStages(boxes), Listener()
    result = detail([textured(seed=1), textured(seed=2)], stages, listener)
    regions = {(k, s.index): s.crop_region for k, item in enumerate(result.per_image) for s in item.segments}
    assert [(f.image_index, f.position, f.crop_region) for f in listener.planned_faces] == [
        (k, i, regions[k, i]) for k in (0, 1) for i in (0, 1)
    ]
    assert sorted(listener.steps) == sorted(
        (k, i, regions[k, i], step) for k in (0, 1) for i in (0, 1) for step in (1, 2, 3)
    )
    assert stages.keywords == [{"on_progress"}, {"on_progress"}]  # one call per image (one wave)


def test_without_a_listener_the_inpainter_gets_no_keyword():
    stages = SteppingStages([face(20, 20, 60, 70)])
    detail([textured()], stages)
    assert stages.keywords == [set()]


def test_a_black_patch_retry_reports_its_steps_for_the_same_face():
    hooks = [{"type": "black_patch_retry", "max_retries": 2}]
    stages, listener = SteppingStages([face(20, 20, 60, 70), face(200, 20, 240, 70)], black_first=True), Listener()
    detail([textured()], stages, listener, detailer_hooks=hooks)
    assert len(stages.keywords) == 2  # the first attempt, then both faces again
    assert sorted(index for _, index, _, _ in listener.steps) == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(index: int, region=(0, 0, 64, 64)) -> SegmentReport:
    return SegmentReport(index=index, bbox=(1, 2, 3, 4), crop_region=region, confidence=0.9, label="face")


def test_progress_events_count_steps_over_cycles_and_estimate_what_remains():
    events, clock = [], Clock()
    progress = RequestProgress(events.append, StreamOptions(), clock)
    faces = [
        PlannedFace(0, 0, (64, 64), crop_region=(0, 0, 64, 64)),
        PlannedFace(0, 1, (64, 64), crop_region=(64, 0, 128, 64)),
    ]
    progress.planned(faces)
    assert events[0] == {
        "event": "plan",
        "faces": [
            {"image": 0, "index": 0, "crop_region": [0, 0, 64, 64], "sample_size": [64, 64]},
            {"image": 0, "index": 1, "crop_region": [64, 0, 128, 64], "sample_size": [64, 64]},
        ],
    }
    progress.step(0, report(0), StepEvent(0, 0, 2, 1, 10))  # face 0: 1 of 20 steps
    first = events[-1]
    assert (first["done"], first["total"], first["eta_s"], first["request_eta_s"]) == (1, 20, None, None)
    assert "preview" not in first
    clock.now += 2.0
    progress.step(0, report(0), StepEvent(0, 0, 2, 5, 10))  # 4 steps in 2 s: 2 steps/s
    second = events[-1]
    assert second["eta_s"] == pytest.approx(15 / 2)
    # the request: face 1 has not started, it is expected to take as many steps (20)
    assert second["request_eta_s"] == pytest.approx((15 + 20) / 2)
    clock.now += 1.0
    progress.step(0, report(0), StepEvent(0, 1, 2, 10, 10))  # cycle 2 of 2, last step
    assert (events[-1]["done"], events[-1]["cycle"], events[-1]["eta_s"]) == (20, 1, 0.0)
    progress.face(report(0))
    assert events[-1]["event"] == "face" and events[-1]["status"] == "refined"
    clock.now += 1.0
    progress.step(0, report(1, (64, 0, 128, 64)), StepEvent(1, 0, 2, 4, 10))
    # 19 + 4 steps since the first step event, over 4 s; face 1 has 16 left
    assert events[-1]["request_eta_s"] == round(16 / (23 / 4.0), 2)
    assert events[-1]["crop_region"] == [64, 0, 128, 64]


def test_a_preview_is_a_jpeg_of_its_size():
    events = []
    progress = RequestProgress(events.append, StreamOptions(preview_every=2))
    preview = np.zeros((6, 9, 3), np.uint8)
    preview[:, :, 0] = 200
    progress.step(0, report(0), StepEvent(0, 0, 1, 2, 4, preview))
    body = events[-1]
    assert body["preview_size"] == [9, 6] and progress.preview_every == 2
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["preview"]))))
    assert decoded.shape == (6, 9, 3) and abs(int(decoded[..., 0].mean()) - 200) <= 3


def test_stream_options_come_out_of_the_request_values():
    values = {"steps": "3", "preview_every": "4", "progress": "false"}
    options = StreamOptions.model_validate(StreamOptions.pop_from(values))
    assert values == {"steps": "3"} and options.preview_every == 4 and options.progress is False
    with pytest.raises(ValueError):
        StreamOptions(preview_every=-1)
