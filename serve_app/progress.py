"""A request's progress as events: the faces to sample, each sampler step with its ETA, finished faces.

:class:`RequestProgress` is the pipeline's :class:`~serve_app.pipeline.StepListener` and its
``on_face`` for one request. It turns what happens into JSON-able event dicts, in this order:

- ``plan`` once, after detection: every face the inpainter will sample (image, index, crop
  region, sample size) — a page can draw each face's progress bar at once;
- ``progress`` per sampler step of a face: cycle and step (``done`` of ``total`` steps over the
  cycles), the face's and the request's ETA, and with ``preview_every`` a small JPEG made from the
  step's x0 latent (:mod:`deployments.latent_preview`), to be drawn over the face's crop region;
- ``face`` when a face is finished (refined or skipped), as before.

The same events feed ``/v1/detail/stream`` (SSE), the handle API's ``detail_with_progress`` and
the Python client. ETAs are measured on the ingress' clock from the steps seen so far: a face's
from its own step rate, the request's from the rate of steps over all its faces (faces sampled
together share UNet calls, so their steps add up), over the work that remains, planned faces
not started yet included.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from serve_app.http_adapters.encoding import segment_json
from serve_app.pipeline import PlannedFace, SegmentReport

PREVIEW_JPEG_QUALITY = 80
Emit = Callable[[dict[str, Any]], None]


class StreamOptions(BaseModel):
    """What a progress stream carries, chosen per request (``/v1/detail/stream`` fields).

    Step events cost the request nothing it would notice (a few hundred bytes per step); previews
    cost a small device → host copy and a JPEG each, so they are opt-in.
    """

    model_config = ConfigDict(extra="forbid")

    progress: bool = Field(True, description="sampler step events (plan, progress); false: face events only")
    preview_every: int = Field(
        0, ge=0, le=10000, description="a latent preview JPEG every k sampler steps (and the last); 0: none"
    )

    FIELDS: ClassVar[tuple[str, ...]] = ("progress", "preview_every")

    @classmethod
    def pop_from(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Take the stream's own fields out of a request's values (the rest are FaceDetailer's)."""
        return {name: values.pop(name) for name in cls.FIELDS if name in values}


def face_event(report: SegmentReport) -> dict[str, Any]:
    """A face finished: refined, or skipped and why (``status`` is "refined" or the skip reason)."""
    status = report.skip_reason if report.skipped else "refined"
    return {"event": "face", "image": report.image_index, "status": status, **segment_json(report)}


def preview_jpeg_base64(preview: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(preview).save(buffer, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class _FaceClock:
    total: int  # steps over all cycles (estimated from the steps of the cycle last seen)
    done: int = 0
    first_at: float | None = None  # clock at the first step seen (the rate is measured from there)
    first_done: int = 0  # steps done then
    finished: bool = False

    def eta_s(self, now: float) -> float | None:
        if self.first_at is None or self.done <= self.first_done or now <= self.first_at:
            return None
        rate = (self.done - self.first_done) / (now - self.first_at)
        return max(self.total - self.done, 0) / rate


class RequestProgress:
    """One request's progress events (see the module docstring), handed to ``emit`` as they happen."""

    def __init__(self, emit: Emit, options: StreamOptions | None = None, clock: Callable[[], float] = time.monotonic):
        self.emit = emit
        self.options = options or StreamOptions()
        self.clock = clock
        self.faces: dict[tuple[int, int], _FaceClock] = {}
        self._steps_seen = 0  # steps of all faces reported so far
        self._first_step_at: float | None = None  # clock at the request's first step event
        self._steps_at_first = 0  # steps seen by then
        self._steps_per_face: int | None = None  # what an unstarted face is expected to take

    @property
    def preview_every(self) -> int:
        return self.options.preview_every

    def face(self, report: SegmentReport) -> None:
        clock = self.faces.get((report.image_index, report.index))
        if clock is not None:
            clock.finished, clock.done = True, clock.total
        self.emit(face_event(report))

    def planned(self, faces: list[PlannedFace]) -> None:
        for face in faces:
            self.faces.setdefault((face.image_index, face.position), _FaceClock(total=0))
        self.emit(
            {
                "event": "plan",
                "faces": [
                    {
                        "image": face.image_index,
                        "index": face.position,
                        "crop_region": list(face.crop_region),
                        "sample_size": list(face.sample_size),
                    }
                    for face in faces
                ],
            }
        )

    def step(self, image_index: int, face: SegmentReport, event: Any) -> None:
        now = self.clock()
        clock = self.faces.setdefault((image_index, face.index), _FaceClock(total=0))
        done, total = int(event.done), int(event.total)
        self._steps_seen += max(done - clock.done, 0)
        if clock.first_at is None:
            clock.first_at, clock.first_done = now, done
        if self._first_step_at is None:
            self._first_step_at, self._steps_at_first = now, self._steps_seen
        clock.done, clock.total = done, total
        self._steps_per_face = total
        body: dict[str, Any] = {
            "event": "progress",
            "image": image_index,
            "index": face.index,
            "crop_region": list(face.crop_region),
            "cycle": event.cycle,
            "cycles": event.cycles,
            "step": event.step,
            "steps": event.steps,
            "done": done,
            "total": total,
            "eta_s": _rounded(clock.eta_s(now)),
            "request_eta_s": _rounded(self._request_eta_s(now)),
        }
        preview = getattr(event, "preview", None)
        if preview is not None:
            body["preview"] = preview_jpeg_base64(preview)
            body["preview_size"] = [int(preview.shape[1]), int(preview.shape[0])]  # width, height
        self.emit(body)

    def _request_eta_s(self, now: float) -> float | None:
        """Remaining steps of every planned face over the request's step rate so far.

        Never less than the slowest face's own ETA: the request ends after its last face.
        """
        steps = self._steps_seen - self._steps_at_first
        if self._first_step_at is None or now <= self._first_step_at or steps <= 0:
            return None
        rate = steps / (now - self._first_step_at)
        expected = self._steps_per_face or 0
        remaining = sum(
            0 if clock.finished else max((clock.total or expected) - clock.done, 0) for clock in self.faces.values()
        )
        slowest = max((eta for clock in self.faces.values() if (eta := clock.eta_s(now)) is not None), default=0.0)
        return max(remaining / rate, slowest)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
