"""Ray Serve deployment classes around the plain model classes.

The plain classes (:class:`FaceDetector`, :class:`SamSegmenter`, :class:`Inpainter`) stay usable
in-process; these wrappers add what serving needs: model calls off the replica's event loop (so
health probes and batching keep running during a long inference), cross-request batching of
crops in the inpainter (``@serve.batch`` counted in crops, live-tunable through ``user_config``),
and health checks that also catch a model that stopped answering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from deployments.detector import FaceDetector
from deployments.inpainter import Inpainter, RefineJob, SamplingSettings, check_job
from deployments.sam import SamPrediction, SamSegmenter
from facedetailer.sam_prompts import SamPrompt
from facedetailer.segs import Detection

logger = logging.getLogger("ray.serve")

DEFAULT_STUCK_AFTER_S = 900.0


class ModelStuckError(RuntimeError):
    """A model call has run far longer than any call should: the replica is reported unhealthy."""


class _Watchdog:
    """Tracks the oldest running model call, so a health probe can tell 'busy' from 'stuck'."""

    def __init__(self, stuck_after_s: float) -> None:
        self.stuck_after_s = stuck_after_s
        self._running: dict[int, float] = {}
        self._next = 0

    async def run(self, function: Any, *args: Any) -> Any:
        token, self._next = self._next, self._next + 1
        self._running[token] = time.monotonic()
        try:
            return await asyncio.to_thread(function, *args)
        finally:
            self._running.pop(token, None)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def check(self) -> None:
        if self._running:
            age = time.monotonic() - min(self._running.values())
            if age > self.stuck_after_s:
                raise ModelStuckError(f"a model call has been running for {age:.0f} s (limit {self.stuck_after_s} s)")


class _ServedModel:
    """What every model deployment shares: info, and a health probe that tells busy from stuck."""

    model: Any
    watchdog: _Watchdog

    def info(self) -> dict[str, Any]:
        return self.model.info()

    def placement(self) -> dict[str, Any]:
        """Node and logical GPU ids of this replica (fractional-GPU packing, tests/cluster/)."""
        from deployments.placement import replica_placement

        return replica_placement()

    async def check_health(self) -> None:
        self.watchdog.check()
        if not self.watchdog.busy:
            await asyncio.to_thread(self.model.check_health)


class DetectorDeployment(_ServedModel):
    """Serves one :class:`FaceDetector`."""

    def __init__(self, model: str, *, stuck_after_s: float = DEFAULT_STUCK_AFTER_S, **options: Any) -> None:
        self.model = FaceDetector(model, **options)
        self.watchdog = _Watchdog(stuck_after_s)

    async def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        return await self.watchdog.run(self.model.detect, image, threshold)


class SamDeployment(_ServedModel):
    """Serves one :class:`SamSegmenter`: one image embedding per call, every prompt answered."""

    def __init__(self, checkpoint: str, *, stuck_after_s: float = DEFAULT_STUCK_AFTER_S, **options: Any) -> None:
        self.model = SamSegmenter(checkpoint, **options)
        self.watchdog = _Watchdog(stuck_after_s)

    async def predict(self, image: np.ndarray, prompts: Sequence[SamPrompt]) -> list[SamPrediction]:
        return await self.watchdog.run(self.model.predict, image, list(prompts))


@dataclass
class _Failed:
    """A batch member's error, handed back to its own caller only."""

    error: BaseException


def _crops_in(batch: list[tuple[list[RefineJob], SamplingSettings]]) -> int:
    """``batch_size_fn``: a batch is as big as the crops it carries, not the requests."""
    return sum(len(jobs) for jobs, _ in batch)


class InpainterDeployment(_ServedModel):
    """Serves one :class:`Inpainter`, batching crops across concurrent requests.

    Each request's crops join a shared queue; a batch closes at ``max_batch_size`` crops or after
    ``batch_wait_timeout_s``. Crops with the same sampling settings go to the model in one call
    (the model groups them by latent size). Both knobs can be changed live through
    ``user_config`` (``serve deploy`` with a new value calls :meth:`reconfigure`).
    """

    def __init__(
        self,
        model: str,
        *,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.05,
        stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
        **options: Any,
    ) -> None:
        self.model = Inpainter(model, max_batch_size=max_batch_size, **options)
        self.watchdog = _Watchdog(stuck_after_s)
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.recent_model_calls: deque[int] = deque(maxlen=256)  # crops per model call, newest last
        self._apply_batching()

    def _apply_batching(self) -> None:
        self._refine_batch.set_max_batch_size(self.max_batch_size)
        self._refine_batch.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live update of ``max_batch_size`` (crops) and ``batch_wait_timeout_s``."""
        unknown = set(user_config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ValueError(f"unknown inpainter user_config keys: {sorted(unknown)}")
        self.max_batch_size = int(user_config.get("max_batch_size", self.max_batch_size))
        self.batch_wait_timeout_s = float(user_config.get("batch_wait_timeout_s", self.batch_wait_timeout_s))
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        self.model.max_batch_size = self.max_batch_size
        self._apply_batching()
        logger.info("inpainter batching: %d crops, %.3f s wait", self.max_batch_size, self.batch_wait_timeout_s)

    async def refine(self, jobs: Sequence[RefineJob], settings: SamplingSettings) -> list[np.ndarray]:
        """Refine a request's crops; they may share a model call with other requests' crops."""
        self.model.validate_settings(settings)
        jobs = list(jobs)
        for index, job in enumerate(jobs):
            check_job(index, job)  # reject a malformed crop before it joins a shared batch
        chunks = [jobs[i : i + self.max_batch_size] for i in range(0, len(jobs), self.max_batch_size)]
        results = await asyncio.gather(*(self._refine_batch((chunk, settings)) for chunk in chunks))
        refined: list[np.ndarray] = []
        for result in results:
            if isinstance(result, _Failed):
                raise result.error
            refined.extend(result)
        return refined

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=_crops_in)
    async def _refine_batch(
        self, requests: list[tuple[list[RefineJob], SamplingSettings]]
    ) -> list[list[np.ndarray] | _Failed]:
        by_settings: dict[str, list[int]] = {}
        for index, (_, settings) in enumerate(requests):
            by_settings.setdefault(settings.model_dump_json(), []).append(index)
        results: list[list[np.ndarray] | _Failed] = [_Failed(RuntimeError("not run"))] * len(requests)
        for members in by_settings.values():
            jobs = [job for index in members for job in requests[index][0]]
            self.recent_model_calls.append(len(jobs))
            try:
                refined = await self.watchdog.run(self.model.refine, jobs, requests[members[0]][1])
            except Exception as error:
                if len(members) == 1:
                    results[members[0]] = _Failed(error)
                    continue
                # one request's crops broke the shared call: retry each alone, so only it fails
                for index in members:
                    try:
                        results[index] = await self.watchdog.run(self.model.refine, *requests[index])
                    except Exception as member_error:
                        results[index] = _Failed(member_error)
                continue
            start = 0
            for index in members:
                count = len(requests[index][0])
                results[index] = refined[start : start + count]
                start += count
        return results

    def batching_stats(self) -> dict[str, Any]:
        """Crops per recent model call: shows whether concurrent requests share batches."""
        return {
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "recent_model_calls": list(self.recent_model_calls),
        }

    def supported_samplers(self) -> list[str]:
        return self.model.supported_samplers()

    def supported_schedulers(self) -> list[str]:
        return self.model.supported_schedulers()

    def info(self) -> dict[str, Any]:
        return {
            **self.model.info(),
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
        }
