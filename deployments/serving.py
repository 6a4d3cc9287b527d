"""Ray Serve deployment classes around the plain model classes.

The plain classes (:class:`FaceDetector`, :class:`SamSegmenter`, :class:`Inpainter`, or their
``sim://`` stand-ins, chosen by :mod:`deployments.model_loading`) stay usable in-process; these
wrappers add what serving needs: model calls off the replica's event loop (so health probes keep
running during a long inference), the inpainter's step-level batching engine in a background
thread (live-tunable through ``user_config``, statistics summed over replicas), and health checks
that also catch a model that stopped answering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import numpy as np
from ray import serve

from deployments.checkpoints import DRAIN_TIMEOUT_S, LoadedCheckpoint, checkpoint_specs, load_options, sum_snapshots
from deployments.engine_stats import STATS_ACTOR_NAME, EngineMetrics, StatsReporter, merge_snapshots
from deployments.families.loading import describe_checkpoint
from deployments.inpainter import Inpainter, RefineJob, RefineResult, SamplingSettings
from deployments.model_loading import load_detector, load_inpainter, load_segmenter
from deployments.sam import SamPrediction
from deployments.step_progress import StepEvent, StepFeed, refine_steps
from deployments.text_encoder import TextEncoder, TextEncoderClient
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

    @property
    def running(self) -> int:
        return len(self._running)

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

    def activity(self) -> dict[str, Any]:
        """This replica (its placement, pid) and the model calls running on it now (chaos runs kill it mid-call)."""
        return {**self.placement(), "running_calls": self.watchdog.running}

    def device_memory(self, reset: bool = False) -> dict[str, Any]:
        """This replica's CUDA memory: peak allocated and reserved bytes since start (or the last reset).

        ``{"device": "cpu"}`` without CUDA (benchmarks/gpu.py reports it per replica).
        """
        import torch

        if not torch.cuda.is_available():
            return {"device": "cpu"}
        memory = {
            "device": torch.cuda.get_device_name(),
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
            "allocated_bytes": torch.cuda.memory_allocated(),
        }
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return memory

    async def check_health(self) -> None:
        self.watchdog.check()
        if not self.watchdog.busy:
            await asyncio.to_thread(self.model.check_health)


class DetectorDeployment(_ServedModel):
    """Serves one :class:`~deployments.detector.FaceDetector` (or its ``sim://`` stand-in)."""

    def __init__(self, model: str, *, stuck_after_s: float = DEFAULT_STUCK_AFTER_S, **options: Any) -> None:
        self.model = load_detector(model, **options)
        self.watchdog = _Watchdog(stuck_after_s)

    async def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        return await self.watchdog.run(self.model.detect, image, threshold)


class SamDeployment(_ServedModel):
    """Serves one :class:`~deployments.sam.SamSegmenter` (or its ``sim://`` stand-in).

    One image embedding per call, every prompt answered.
    """

    def __init__(self, checkpoint: str, *, stuck_after_s: float = DEFAULT_STUCK_AFTER_S, **options: Any) -> None:
        self.model = load_segmenter(checkpoint, **options)
        self.watchdog = _Watchdog(stuck_after_s)

    async def predict(self, image: np.ndarray, prompts: Sequence[SamPrompt]) -> list[SamPrediction]:
        return await self.watchdog.run(self.model.predict, image, list(prompts))


class TextEncoderDeployment(_ServedModel):
    """Serves the SD3/Flux checkpoints' text encoders to every inpainter replica (:mod:`deployments.text_encoder`).

    One copy of each encoder set (T5-XXL is larger than an SD 1.5 UNet) and one prompt cache for
    all inpainter replicas; a cache hit answers without touching the encoders.
    """

    def __init__(
        self, checkpoints: str | Mapping[str, Any], *, stuck_after_s: float = DEFAULT_STUCK_AFTER_S, **options: Any
    ) -> None:
        self.model = TextEncoder(checkpoints, **options)
        self.watchdog = _Watchdog(stuck_after_s)

    async def encode(self, checkpoint: str, chunks: Sequence[str]) -> Any:
        return await self.watchdog.run(self.model.encode, checkpoint, tuple(chunks))

    async def prompt_tokenizers(self, checkpoint: str) -> list[tuple[Any, int]]:
        return await self.watchdog.run(self.model.prompt_tokenizers, checkpoint)

    def stats(self) -> dict[str, Any]:
        """This replica's prompt cache counters and encodes (``GET /v1/stats``: the replica that answers)."""
        return {**self.model.stats(), "replica": _replica_name()}


class InpainterDeployment(_ServedModel):
    """Serves the configured checkpoints (:class:`Inpainter` s), each with its engine loop in a background thread.

    Every request's crops join the engine of the checkpoint it names (``multiplexed_model_id``,
    :mod:`deployments.checkpoints`); at each step an engine runs the pending UNet evaluations of
    all its active crops (same latent size and LoRA set) as one UNet call, so crops of concurrent
    requests share calls whatever their settings, with no batch wait — and crops of different
    checkpoints never share one (each checkpoint has its own engine). A replica holds at most
    ``max_models_per_replica`` checkpoints (Ray Serve model multiplexing, LRU eviction); the
    first one is loaded at start. A full queue is an :class:`EngineBusyError` (the ingress
    answers 503 with Retry-After); a cancelled call (the client left, or the ingress timed out)
    takes its crops out of the engine at the next step. ``max_batch_size`` (active crops per
    checkpoint) and ``max_queued_crops`` are the deployment's ``user_config``: a ``serve deploy``
    with new values calls :meth:`reconfigure` live. ``text_encoder``: the :class:`TextEncoderDeployment`'s
    handle, when the application has one: SD3/Flux checkpoints are loaded without text encoders and
    encode their prompts there.
    """

    def __init__(
        self,
        model: str | Mapping[str, Any],
        *,
        single_file_config: str | None = None,
        max_models_per_replica: int = 2,
        max_batch_size: int = 8,
        max_queued_crops: int = 256,
        stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
        text_encoder: Any = None,
        **options: Any,
    ) -> None:
        self.checkpoints = checkpoint_specs(model, single_file_config)
        self.text_encoder = text_encoder
        self.default_checkpoint = next(iter(self.checkpoints))
        self.options = options
        self.bounds = {"max_batch_size": max_batch_size, "max_queued_crops": max_queued_crops}
        self.stuck_after_s = stuck_after_s
        self.max_models_per_replica = max_models_per_replica
        self.loaded: dict[str, LoadedCheckpoint] = {}
        self.retired_snapshots: list[dict[str, Any]] = []
        self._shared_controlnets: Any = None
        self._default_adopted = False
        self._local_lock = asyncio.Lock()
        self._last_model: Inpainter | None = None  # answers info() while the only checkpoint is swapped
        self._descriptions: dict[str, dict[str, Any]] | None = None

        async def load(name: str) -> LoadedCheckpoint:  # a plain function: Serve keeps its LRU cache on it
            return await self._load_checkpoint(name)

        self._get_checkpoint = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load)
        self._load_now(self.default_checkpoint)  # ready (and health-checked) before the first request
        self.reporter = StatsReporter(
            replica=_replica_name(),
            snapshot=self.snapshot,
            aggregator=_stats_aggregator,
            metrics=_engine_metrics(),
        )
        self.reporter.start()

    # ---------------------------------------------------------------- checkpoints

    @property
    def model(self) -> Inpainter:
        """The default checkpoint's inpainter when loaded, else the most recently loaded one."""
        loaded = self.loaded.get(self.default_checkpoint) or next(reversed(list(self.loaded.values())), None)
        if loaded is not None:
            self._last_model = loaded.inpainter
        if self._last_model is None:
            raise RuntimeError("no checkpoint is loaded right now (one is being swapped in); retry")
        return self._last_model

    @property
    def engine(self) -> Any:
        return self.model.engine

    def _load_now(self, name: str) -> LoadedCheckpoint:
        spec = self.checkpoints[name]
        controlnets = self._shared_controlnets or self.options.get("controlnets")
        options = {**self.options, "controlnets": controlnets}
        if self.text_encoder is not None:
            options["text_encoder"] = TextEncoderClient.remote(self.text_encoder, name)
        inpainter = load_inpainter(**load_options(spec, options), **self.bounds)
        self._shared_controlnets = inpainter.controlnets  # ControlNet weights loaded once per replica
        loaded = LoadedCheckpoint(name, inpainter)
        retire = loaded.retire

        def retire_and_forget(timeout_s: float = DRAIN_TIMEOUT_S) -> None:
            retire(timeout_s)
            self.retired_snapshots.append({**loaded.engine.snapshot(), "active_crops": 0, "queued_crops": 0})
            self.loaded.pop(name, None)
            if self._last_model is loaded.inpainter:
                self._last_model = None
            loaded.release()  # the weights go now, before the next checkpoint loads

        loaded.__del__ = retire_and_forget  # what Ray Serve's LRU eviction calls
        self.loaded[name] = loaded
        return loaded

    async def _load_checkpoint(self, name: str) -> LoadedCheckpoint:
        """The multiplexed loader (``@serve.multiplexed``, applied in ``__init__`` with the configured size)."""
        if name not in self.checkpoints:
            raise ValueError(f"model: unknown checkpoint {name!r}; configured: {', '.join(self.checkpoints)}")
        if name in self.loaded:  # the checkpoint loaded at start, handed to the LRU cache
            return self.loaded[name]
        return await asyncio.to_thread(self._load_now, name)

    async def checkpoint(self, name: str | None = None) -> LoadedCheckpoint:
        """The named (default: the request's ``multiplexed_model_id``, else the first) checkpoint, loaded."""
        name = name or serve.get_multiplexed_model_id() or self.default_checkpoint
        if name not in self.checkpoints:
            raise ValueError(f"model: unknown checkpoint {name!r}; configured: {', '.join(self.checkpoints)}")
        if _internal_replica_context() is None:  # local testing mode: Serve's multiplexer needs a replica
            return await self._local_checkpoint(name)
        if not self._default_adopted:  # the LRU cache learns of the checkpoint loaded at start first
            self._default_adopted = True
            await self._get_checkpoint(self.default_checkpoint)
        return await self._get_checkpoint(name)

    async def _local_checkpoint(self, name: str) -> LoadedCheckpoint:
        """The same LRU policy without Serve's multiplexer (``serve.run(..., _local_testing_mode=True)``)."""
        async with self._local_lock:
            if name in self.loaded:
                self.loaded[name] = self.loaded.pop(name)  # most recently used last
                return self.loaded[name]
            while len(self.loaded) >= self.max_models_per_replica:
                oldest = next(iter(self.loaded.values()))
                await asyncio.to_thread(oldest.__del__)
            return await asyncio.to_thread(self._load_now, name)

    # ---------------------------------------------------------------- serving

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live update of ``max_batch_size`` (active crops) and ``max_queued_crops`` of every checkpoint."""
        unknown = set(user_config) - {"max_batch_size", "max_queued_crops"}
        if unknown:
            raise ValueError(f"unknown inpainter user_config keys: {sorted(unknown)}")
        self.bounds.update({key: value for key, value in user_config.items() if value is not None})
        for loaded in list(self.loaded.values()):
            loaded.engine.configure(
                max_batch_size=user_config.get("max_batch_size"), max_queued_crops=user_config.get("max_queued_crops")
            )
        logger.info("inpainter engines: %(max_batch_size)d active crops, %(max_queued_crops)d queued", self.bounds)

    async def refine(
        self,
        jobs: Sequence[RefineJob],
        settings: SamplingSettings | None = None,
        model: str | None = None,
        *,
        tenant: str = "",
        weight: float = 1.0,
    ) -> RefineResult:
        """Refine a request's crops (each with its own settings, or ``settings``) on a checkpoint's engine.

        The checkpoint is ``model``, else the call's ``multiplexed_model_id``, else the first one.
        (Callers pass both: the id routes the call, the argument also reaches local testing mode.)
        ``tenant``/``weight``: the caller's share of the engine's fair queue (an API key's id).
        """
        loaded = await self.checkpoint(model)
        return await loaded.refine(jobs, settings, tenant=tenant, weight=weight)

    async def refine_stream(
        self,
        jobs: Sequence[RefineJob],
        settings: SamplingSettings | None = None,
        model: str | None = None,
        *,
        preview_every: int = 0,
        tenant: str = "",
        weight: float = 1.0,
    ) -> AsyncIterator[list[StepEvent] | RefineResult]:
        """:meth:`refine` as a stream (``handle.options(stream=True)``): lists of sampler steps, then the result.

        Each :class:`~deployments.step_progress.StepEvent` is a step of one crop (its index in
        ``jobs``), with a latent preview every ``preview_every`` steps (0: none). Cancelling the
        stream takes the crops out of the engine, as cancelling :meth:`refine` does.
        """
        loaded = await self.checkpoint(model)
        feed = StepFeed.for_jobs(loaded.inpainter, jobs, preview_every)

        def run(on_progress: StepFeed) -> Any:
            return loaded.refine(jobs, settings, tenant=tenant, weight=weight, on_progress=on_progress)

        async for item in refine_steps(run, feed):
            yield item

    async def prompt_tokenizers(self, model: str | None = None) -> list[tuple[Any, int]]:
        """The checkpoint's tokenizers and window lengths (the ingress counts prompt tokens with them)."""
        loaded = await self.checkpoint(model)
        # in a thread: a checkpoint whose text encoders are shared asks the TextEncoder deployment (blocking)
        return await asyncio.to_thread(loaded.inpainter.prompt_tokenizers)

    def snapshot(self) -> dict[str, Any]:
        """This replica's engine counters: every checkpoint's engine, unloaded ones included."""
        live = [loaded.engine.snapshot() for loaded in list(self.loaded.values())]
        return sum_snapshots(self.retired_snapshots + live)

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
        """Unhealthy if an engine loop died or one model call has run for longer than ``stuck_after_s``."""
        for loaded in list(self.loaded.values()):
            engine = loaded.engine
            if loaded.retired:
                continue
            if engine.loop_error is not None or not engine.running:
                raise RuntimeError(f"inpaint engine of {loaded.name} is not running ({engine.loop_error!r})")
            started = engine.model_call_started
            if started is not None:
                age = time.monotonic() - started
                if age > self.stuck_after_s:
                    limit = self.stuck_after_s
                    raise ModelStuckError(f"a model call has been running for {age:.0f} s (limit {limit} s)")
                continue
            await asyncio.to_thread(loaded.inpainter.check_health)

    def activity(self) -> dict[str, Any]:
        """This replica (its placement, pid) and the ``refine`` calls running on it now, over its checkpoints."""
        return {**self.placement(), "running_calls": sum(loaded.inflight for loaded in list(self.loaded.values()))}

    def checkpoint_snapshots(self) -> dict[str, dict[str, Any]]:
        """Each loaded checkpoint's own engine counters (its engine only ever batches its own crops)."""
        return {name: loaded.engine.snapshot() for name, loaded in list(self.loaded.items())}

    def checkpoint_descriptions(self) -> dict[str, dict[str, Any]]:
        """Each configured checkpoint's family, prediction, model sampling and stored weight dtype (``GET /v1/info``).

        Read from the files' headers and configs (no weights), once; whether it is loaded on this
        replica, and in which dtype it runs, are added live.
        """
        if self._descriptions is None:
            self._descriptions = {
                name: describe_checkpoint({key: value for key, value in spec.items() if key != "precision"})
                for name, spec in self.checkpoints.items()
            }
        described = {}
        for name, description in self._descriptions.items():
            loaded = self.loaded.get(name)
            described[name] = {**description, "loaded": loaded is not None}
            if loaded is not None and loaded.inpainter is not None:
                described[name]["dtype"] = str(loaded.inpainter.dtype).removeprefix("torch.")
        return described

    def supported_samplers(self) -> list[str]:
        return self.model.supported_samplers()

    def supported_schedulers(self) -> list[str]:
        return self.model.supported_schedulers()

    def info(self) -> dict[str, Any]:
        snapshot = self.snapshot()
        snapshot["queue_wait_s"].pop("recent")
        return {
            **self.model.info(),
            "checkpoints": self.checkpoint_descriptions(),
            "loaded_checkpoints": list(self.loaded),
            "max_models_per_replica": self.max_models_per_replica,
            "engine": snapshot,
        }


def _internal_replica_context() -> Any:
    from ray.serve.context import _get_internal_replica_context

    return _get_internal_replica_context()


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
