"""Ray Serve deployment classes around the plain model classes.

The plain classes (:class:`FaceDetector`, :class:`SamSegmenter`, :class:`Inpainter`) stay usable
in-process; these wrappers add what serving needs: model calls off the replica's event loop (so
health probes keep running during a long inference), the inpainter's step-level batching engine
in a background thread (live-tunable through ``user_config``, statistics summed over replicas),
and health checks that also catch a model that stopped answering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray import serve

from deployments.detector import FaceDetector
from deployments.engine_stats import STATS_ACTOR_NAME, EngineMetrics, StatsReporter, merge_snapshots
from deployments.inpainter import Inpainter, RefineJob, RefineResult, SamplingSettings, result_of
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


class InpainterDeployment(_ServedModel):
    """Serves one :class:`Inpainter`: its engine loop runs in a background thread of the replica.

    Every request's crops join the engine's queue; at each step the engine runs the pending UNet
    evaluations of all active crops (same latent size and LoRA set) as one UNet call, so crops of
    concurrent requests share calls whatever their settings, with no batch wait. A full queue is
    an :class:`EngineBusyError` (the ingress answers 503 with Retry-After); a cancelled call (the
    client left, or the ingress timed out) takes its crops out of the engine at the next step.
    ``max_batch_size`` (active crops) and ``max_queued_crops`` are the deployment's
    ``user_config``: a ``serve deploy`` with new values calls :meth:`reconfigure` live.
    """

    def __init__(
        self,
        model: str,
        *,
        max_batch_size: int = 8,
        max_queued_crops: int = 256,
        stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
        **options: Any,
    ) -> None:
        self.model = Inpainter(model, max_batch_size=max_batch_size, max_queued_crops=max_queued_crops, **options)
        self.engine = self.model.engine
        self.stuck_after_s = stuck_after_s
        self.engine.start(name="inpaint-engine")
        self.reporter = StatsReporter(
            replica=_replica_name(),
            snapshot=self.engine.snapshot,
            aggregator=_stats_aggregator,
            metrics=_engine_metrics(),
        )
        self.reporter.start()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live update of ``max_batch_size`` (active crops) and ``max_queued_crops``."""
        unknown = set(user_config) - {"max_batch_size", "max_queued_crops"}
        if unknown:
            raise ValueError(f"unknown inpainter user_config keys: {sorted(unknown)}")
        self.engine.configure(
            max_batch_size=user_config.get("max_batch_size"), max_queued_crops=user_config.get("max_queued_crops")
        )
        logger.info(
            "inpainter engine: %d active crops, %d queued", self.engine.max_batch_size, self.engine.max_queued_crops
        )

    async def refine(self, jobs: Sequence[RefineJob], settings: SamplingSettings | None = None) -> RefineResult:
        """Refine a request's crops (each with its own settings, or ``settings``) on the shared engine."""
        payloads = self.model.payloads(list(jobs), settings)  # bad crops and settings fail here, alone
        request = self.engine.submit(payloads)
        try:
            images = await asyncio.wrap_future(request.future)
        except asyncio.CancelledError:
            self.engine.cancel(request)
            raise
        return result_of(request, images)

    async def stats(self) -> dict[str, Any]:
        """This deployment's engine statistics summed over all its replicas (see ``engine_stats``)."""
        own = self.reporter.push()
        try:
            handle = _stats_aggregator()
            await handle.report.remote(self.reporter.replica, own)
            summary = await asyncio.wait_for(asyncio.wrap_future(handle.summary.remote().future()), timeout=10)
            return {**summary, "aggregated": True}
        except Exception as error:  # no aggregator (e.g. deployed without it): this replica only
            logger.debug("engine stats aggregator unavailable: %s", error)
            return {**merge_snapshots({self.reporter.replica: (time.time(), own)}), "aggregated": False}

    async def check_health(self) -> None:
        """Unhealthy if the engine loop died or one model call has run for longer than ``stuck_after_s``."""
        if self.engine.loop_error is not None or not self.engine.running:
            raise RuntimeError(f"inpaint engine loop is not running ({self.engine.loop_error!r})")
        started = self.engine.model_call_started
        if started is not None:
            age = time.monotonic() - started
            if age > self.stuck_after_s:
                raise ModelStuckError(f"a model call has been running for {age:.0f} s (limit {self.stuck_after_s} s)")
            return
        await asyncio.to_thread(self.model.check_health)

    def supported_samplers(self) -> list[str]:
        return self.model.supported_samplers()

    def supported_schedulers(self) -> list[str]:
        return self.model.supported_schedulers()

    def info(self) -> dict[str, Any]:
        snapshot = self.engine.snapshot()
        snapshot["queue_wait_s"].pop("recent")
        return {**self.model.info(), "engine": snapshot}


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (tests constructing the class directly)
        return f"local-{id(object())}"


def _stats_aggregator() -> Any:
    return serve.get_deployment_actor(STATS_ACTOR_NAME)


def _engine_metrics() -> EngineMetrics | None:
    try:
        return EngineMetrics()
    except Exception:  # outside a Ray worker
        return None
