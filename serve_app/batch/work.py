"""One image on its way through a bulk job's stages, and how its failure is recorded.

Ray Data moves rows between the stages; a row carries an :class:`ImageWork` pickled in its
``work`` column (images of any size, detections, the prepared faces, the result), plus the
``input`` and ``key`` columns in the clear for Ray Data's logs. A stage that fails on one image
records the error in its work and passes it on, so a bad input becomes a manifest row and never
fails the job.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from serve_app.batch.manifest import ERROR, OK, REJECTED

WORK_COLUMN = "work"
# The service answers these with a 4xx (the input or the parameters are at fault): in a bulk job
# the input is "rejected" and a resumed job does not try it again. Anything else is an "error".
_REJECTED_NAMES = frozenset(
    {
        "ImageInputError",  # unreadable, unsupported or over a size limit (serve_app.images)
        "LimitExceededError",  # over a work limit once its faces are planned (serve_app.limits)
        "PipelineInputError",  # e.g. a ControlNet the config lacks (serve_app.pipeline)
        "UnsafeNameError",  # a LoRA or wildcard name leaving its folder
        "BlackPatchError",  # every black_patch_retry attempt black (the reference raises too)
        "PromptSyntaxError",
        "UnsupportedSamplerError",
    }
)


@dataclass
class ImageWork:
    """What the stages know about one input so far."""

    input: str
    key: str
    path: str
    source: str
    size: int | None = None
    image: np.ndarray | None = None  # uint8 [H, W, 3] as decoded, then None once detailed
    width: int | None = None
    height: int | None = None
    detections: list[Any] | None = None
    segm_detections: list[Any] | None = None
    prepared: Any = None  # serve_app.pipeline.PreparedImage once its faces are planned
    result: Any = None  # serve_app.pipeline.ImageResult once detailed
    timings: dict[str, float] = field(default_factory=dict)
    status: str = OK
    error: str | None = None

    @property
    def pending(self) -> bool:
        """Still going: no stage failed on it."""
        return self.status == OK

    def fail(self, error: BaseException) -> None:
        """Record ``error`` (rejected or error, see :func:`classify`) and drop the pixels."""
        self.status, self.error = classify(error)
        self.image = self.prepared = self.result = None
        self.detections = self.segm_detections = None

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


def classify(error: BaseException) -> tuple[str, str]:
    """``(status, message)``: ``rejected`` for what the service answers with a 4xx, else ``error``."""
    names = {cls.__name__ for cls in type(error).__mro__}
    message = str(error) or type(error).__name__
    if names & _REJECTED_NAMES:
        return REJECTED, message
    if isinstance(error, ValueError) and not isinstance(error, UnicodeError):
        # as the ingress: the inpainter refusing a crop's settings, a bad prompt… (HTTP 422)
        return REJECTED, message
    if isinstance(error, TimeoutError):
        return ERROR, f"timed out: {message}"
    return ERROR, f"{type(error).__name__}: {message}"[:2000]


def works_of(batch: pa.Table) -> list[ImageWork]:
    return [pickle.loads(value) for value in batch.column(WORK_COLUMN).to_pylist()]


def table_of(works: list[ImageWork]) -> pa.Table:
    return pa.table(
        {
            "input": pa.array([work.input for work in works], pa.string()),
            "key": pa.array([work.key for work in works], pa.string()),
            WORK_COLUMN: pa.array(
                [pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL) for work in works], pa.large_binary()
            ),
        }
    )


def pending(works: list[ImageWork]) -> Iterator[ImageWork]:
    return (work for work in works if work.pending)
