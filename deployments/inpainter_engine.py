"""Step-level continuous batching of crops across requests: the inpainter's engine loop.

Each crop carries its own sampler state: a list of *stages* (one per FaceDetailer cycle, later
also hook stages such as an unsampler), each a generator that yields one :class:`UNetRequest`
per model evaluation it needs and returns the latent it ends with (the sampling package's
``CropProcess``). The engine does not know any sampler. At every step it

1. drops the crops of cancelled requests, then admits queued crops while fewer than
   ``max_batch_size`` are active, preparing them in batches (VAE encode, text, masks); the queue
   is fair between tenants (API keys): weighted start-time fair queueing by each crop's cost
   (:mod:`deployments.fair_queue`), first in, first out within a tenant;
2. groups the pending requests of all active crops by the backend's *group key* (latent size,
   LoRA set, …: whatever must be equal to share one UNet call) and runs each group as ONE UNet
   call with per-sample timesteps, then sends each crop its own outputs;
3. moves a crop whose stage returned to its next stage, and a crop whose last stage returned to
   the finished list; finished crops are decoded in batches and handed back to their request.

Each sampler step of a crop may be reported to its request's ``on_progress`` (step i of n and the
step's x0 latent, in the engine's thread), for progress bars and previews.

So crops with different steps, samplers, cfg or denoise share UNet calls, a crop joins at the
next step after it arrives (a lone crop starts at once: there is no batch wait), a cancelled
request's crops leave at the next step, and a crop that fails (in preparation, a UNet call, its
sampler or decoding) fails alone: a shared call that raises is retried crop by crop.

The engine is model-agnostic: an :class:`EngineBackend` (``deployments.inpainter.Inpainter``)
prepares, evaluates and finishes crops. It runs either synchronously in the caller's thread
(:meth:`InpaintEngine.run`, the in-process path) or in a background thread (:meth:`start`, one
per inpainter replica), fed from other threads through :meth:`submit`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from deployments.fair_queue import FairQueue

logger = logging.getLogger(__name__)

__all__ = [
    "CropProgress",
    "EngineBackend",
    "EngineBusyError",
    "EngineCrop",
    "EngineRequest",
    "InpaintEngine",
    "RequestCancelledError",
    "Stage",
]

QUEUE_WAIT_SAMPLES = 2048  # recent queue waits kept for percentiles


class EngineBusyError(RuntimeError):
    """The engine's queue is full: the caller should retry later (HTTP 503 with Retry-After)."""


class RequestCancelledError(RuntimeError):
    """The request was cancelled (client gone or timed out) before its crops finished."""


# A stage: given the crop and its current latent, a generator that yields UNet requests, is sent
# UNet responses and returns the next latent (``deployments.sampling.CropProcess``).
Stage = Callable[["EngineCrop", torch.Tensor], Any]


@dataclass(eq=False)
class EngineCrop:
    """One crop inside the engine: its backend payload and its sampling state."""

    request: EngineRequest
    index: int  # position in its request
    payload: Any  # the backend's input (job + settings)
    serial: int = field(default_factory=itertools.count().__next__)  # unique for the process's life
    # filled by EngineBackend.prepare
    group_key: Hashable = None  # crops with equal keys may share a UNet call
    latent: torch.Tensor | None = None  # the current latent: a stage's input, then its output
    stages: list[Stage] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # the backend's per-crop tensors
    # engine state
    stage_index: int = -1
    process: Any = None  # the running stage's generator
    pending: Any = None  # its UNetRequest waiting for the next UNet call
    admitted_at: float | None = None
    unet_evaluations: int = 0
    result: Any = None
    error: BaseException | None = None
    done: bool = False


@dataclass(frozen=True)
class CropProgress:
    """One sampler step of one crop, as ComfyUI's progress callback sees it (step ``step`` of ``steps``)."""

    index: int  # the crop's position in its request
    cycle: int  # FaceDetailer cycle, from 0
    cycles: int
    step: int  # steps done in this cycle's run, from 1
    steps: int  # steps of this cycle's run
    latent: Any  # the step's x0 (the sampler's ``denoised``): a preview source; do not keep or modify it


@dataclass(eq=False)
class EngineRequest:
    """A caller's crops, resolved together: the future holds the results in crop order."""

    submitted_at: float
    crops: list[EngineCrop] = field(default_factory=list)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: bool = False
    remaining: int = 0
    finished_at: float | None = None  # monotonic time its last crop's result was ready
    tenant: str = ""  # who asked (an API key's id): the queue is fair between tenants
    weight: float = 1.0  # the tenant's share relative to others
    # Called in the engine's thread for every sampler step of its crops; must be quick and must
    # not raise (an exception is logged and the reporting stops for this request).
    on_progress: Callable[[CropProgress], None] | None = None

    @property
    def engine_s(self) -> float:
        """Time in the engine: from submission until its results were ready (or until now)."""
        return (self.finished_at or time.monotonic()) - self.submitted_at

    @property
    def dropped(self) -> bool:
        """Cancelled by the caller (flag or a cancelled future) or failed: its crops should leave."""
        return self.cancelled or self.future.cancelled()

    @property
    def queue_wait_s(self) -> float:
        """Time from submission until the last of its crops was admitted (or until now)."""
        admitted = [crop.admitted_at for crop in self.crops]
        if any(value is None for value in admitted):
            return time.monotonic() - self.submitted_at
        return max(admitted, default=self.submitted_at) - self.submitted_at  # type: ignore[type-var]


class EngineBackend(Protocol):
    """The model side of the engine (the inpainter): everything that touches a model."""

    def prepare(self, crops: Sequence[EngineCrop]) -> None:
        """Set each crop's ``latent``, ``group_key``, ``stages`` (batched model work: VAE, text)."""

    def evaluate(self, key: Hashable, calls: Sequence[tuple[EngineCrop, Any]]) -> list[Any]:
        """One UNet call for crops of one group: a ``UNetResponse`` per (crop, ``UNetRequest``)."""

    def finish(self, crops: Sequence[EngineCrop]) -> list[Any]:
        """The result of each finished crop (decode its final latent)."""

    def order_groups(self, keys: Sequence[Hashable]) -> list[Hashable]:
        """The order to run this step's groups in (e.g. the LoRA set already merged first)."""

    # Optional: ``synchronize()``, called before the engine reads a device value on the host
    # (a stage's latent checked for finiteness); see ``Inpainter.synchronize``. Optional:
    # ``cost(payload) -> float``, a crop's work for fair queueing (default 1 per crop).


@dataclass
class EngineStats:
    """Counters since start (one engine = one replica)."""

    unet_batch_sizes: Counter = field(default_factory=Counter)  # crops per UNet call → calls
    unet_rows: int = 0  # UNet batch rows (cond + uncond) over all calls
    unet_seconds: float = 0.0
    steps: int = 0
    crops_submitted: int = 0
    crops_completed: int = 0
    crops_failed: int = 0
    crops_cancelled: int = 0
    requests_rejected: int = 0
    queue_waits: deque = field(default_factory=lambda: deque(maxlen=QUEUE_WAIT_SAMPLES))
    queue_wait_count: int = 0
    queue_wait_total_s: float = 0.0
    queue_wait_max_s: float = 0.0


class InpaintEngine:
    """The loop; see the module docstring."""

    def __init__(
        self,
        backend: EngineBackend,
        *,
        max_batch_size: int = 8,
        max_queued_crops: int = 256,
        on_unet_call: Callable[[int, int, float], None] | None = None,
        on_queue_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.backend = backend
        self._synchronize: Callable[[], None] = getattr(backend, "synchronize", None) or (lambda: None)
        self.configure(max_batch_size=max_batch_size, max_queued_crops=max_queued_crops)
        self.on_unet_call = on_unet_call
        self.on_queue_wait = on_queue_wait
        self.stats = EngineStats()
        self._cost: Callable[[Any], float] = getattr(backend, "cost", None) or (lambda payload: 1.0)
        self._queue: FairQueue[EngineCrop] = FairQueue()
        self._active: list[EngineCrop] = []
        self._lock = threading.Lock()  # guards the queue, the request flags and the stats
        self._wake = threading.Condition(self._lock)
        self._drive = threading.Lock()  # one thread steps the engine at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.model_call_started: float | None = None  # monotonic start of the running model call
        self.torch_threads: int | None = None  # torch's intra-op threads in the thread that last stepped
        self.loop_error: BaseException | None = None

    # ------------------------------------------------------------------ configuration

    def configure(self, *, max_batch_size: int | None = None, max_queued_crops: int | None = None) -> None:
        """Live-tunable bounds (the deployment's ``user_config``); take effect at the next step."""
        if max_batch_size is not None:
            if max_batch_size < 1:
                raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
            self.max_batch_size = int(max_batch_size)
        if max_queued_crops is not None:
            if max_queued_crops < 1:
                raise ValueError(f"max_queued_crops must be >= 1, got {max_queued_crops}")
            self.max_queued_crops = int(max_queued_crops)

    # ------------------------------------------------------------------ submitting

    def submit(
        self,
        payloads: Sequence[Any],
        *,
        tenant: str = "",
        weight: float = 1.0,
        on_progress: Callable[[CropProgress], None] | None = None,
    ) -> EngineRequest:
        """Queue a request's crops (fair between tenants, FIFO within one). Raises
        :class:`EngineBusyError` when the queue is full.

        A request is refused only when it would push a non-empty queue past ``max_queued_crops``:
        a request larger than the bound is still accepted into an empty queue.
        """
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight!r}")
        request = EngineRequest(
            submitted_at=time.monotonic(), tenant=str(tenant), weight=float(weight), on_progress=on_progress
        )
        request.future.set_running_or_notify_cancel()  # only the engine resolves it: no cancel race
        request.crops = [EngineCrop(request=request, index=i, payload=payload) for i, payload in enumerate(payloads)]
        request.remaining = len(request.crops)
        with self._lock:
            if self._queue and len(self._queue) + len(request.crops) > self.max_queued_crops:
                self.stats.requests_rejected += 1
                raise EngineBusyError(
                    f"inpainter queue is full ({len(self._queue)} crops waiting, limit {self.max_queued_crops}); "
                    "retry later"
                )
            if not request.crops:
                request.future.set_result([])
                return request
            costs = [float(self._cost(crop.payload)) for crop in request.crops]
            self._queue.extend(request.crops, costs, tenant=request.tenant, weight=request.weight)
            self.stats.crops_submitted += len(request.crops)
            self._wake.notify_all()
        return request

    def cancel(self, request: EngineRequest) -> None:
        """Drop a request's crops: queued ones at once, active ones at the next step."""
        with self._lock:
            request.cancelled = True
            self._wake.notify_all()

    def run(self, payloads: Sequence[Any]) -> list[Any]:
        """Submit and wait for the results (see :meth:`wait`)."""
        return self.wait(self.submit(payloads))

    def wait(self, request: EngineRequest) -> list[Any]:
        """The request's results: drives the engine in this thread unless the background loop runs."""
        if self.running:
            return request.future.result()
        with self._drive:
            while not request.future.done() and self.step():
                pass
        return request.future.result(timeout=0)

    # ------------------------------------------------------------------ background loop

    def start(self, name: str = "inpaint-engine") -> None:
        """Run the loop in a daemon thread (served replicas)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._serve_forever, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _serve_forever(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and not self._queue and not self._active:
                        self._wake.wait()
                    if self._stopping:
                        return
                with self._drive:
                    self.step()
        except BaseException as error:  # the replica's health check reports it
            self.loop_error = error
            logger.exception("inpaint engine loop died")
            self._fail_everything(error)
            raise

    # ------------------------------------------------------------------ one step

    def step(self) -> bool:
        """One engine step; returns False when there was nothing to do."""
        self.torch_threads = torch.get_num_threads()  # per thread: what this step's model calls use
        with torch.inference_mode():
            self._drop_cancelled()
            admitted = self._admit()
            finished = self._prepare(admitted) if admitted else []
            if self._active:
                finished += self._evaluate()
            elif not admitted:
                return False
            if finished:
                self._finish(finished)
        with self._lock:
            self.stats.steps += 1
        return True

    def _drop_cancelled(self) -> None:
        with self._lock:
            if not any(crop.request.dropped for crop in self._queue) and not any(
                crop.request.dropped for crop in self._active
            ):
                return
            dropped = self._queue.remove_if(lambda crop: crop.request.dropped)
        dropped += [crop for crop in self._active if crop.request.dropped]
        self._active = [crop for crop in self._active if not crop.request.dropped]
        for crop in dropped:
            self._close(crop)
        with self._lock:
            self.stats.crops_cancelled += len(dropped)
            for request in {id(crop.request): crop.request for crop in dropped}.values():
                if not request.future.done():
                    request.future.set_exception(RequestCancelledError("request cancelled"))

    def _admit(self) -> list[EngineCrop]:
        admitted: list[EngineCrop] = []
        now = time.monotonic()
        with self._lock:
            while self._queue and len(self._active) + len(admitted) < self.max_batch_size:
                crop = self._queue.pop()
                crop.admitted_at = now
                admitted.append(crop)
                wait = now - crop.request.submitted_at
                stats = self.stats
                stats.queue_waits.append(wait)
                stats.queue_wait_count += 1
                stats.queue_wait_total_s += wait
                stats.queue_wait_max_s = max(stats.queue_wait_max_s, wait)
        if self.on_queue_wait is not None:
            for crop in admitted:
                self.on_queue_wait(crop.admitted_at - crop.request.submitted_at)  # type: ignore[operator]
        return admitted

    def _prepare(self, crops: list[EngineCrop]) -> list[EngineCrop]:
        """Batch-prepare newly admitted crops (one by one after an error, so only a bad one fails).

        Returns the crops that are already finished (no stage needed a model call).
        """
        finished = []
        for crop in self._isolated(self.backend.prepare, crops):
            try:
                self._next_request(crop, None)
            except Exception as error:
                self._fail(crop, error)
                continue
            if crop.done:
                finished.append(crop)
            else:
                self._active.append(crop)
        return finished

    def _isolated(self, function: Callable[[Sequence[EngineCrop]], Any], crops: list[EngineCrop]) -> list[EngineCrop]:
        """Run ``function`` on all crops; if it raises, on each alone. Returns the crops that passed."""
        self.model_call_started = time.monotonic()
        try:
            function(crops)
            return crops
        except Exception as error:
            if len(crops) == 1:
                self._fail(crops[0], error)
                return []
        finally:
            self.model_call_started = None
        passed = []
        for crop in crops:
            passed.extend(self._isolated(function, [crop]))
        return passed

    def _next_request(self, crop: EngineCrop, response: Any) -> None:
        """Advance ``crop``'s current stage (starting the first/next one as needed) to its next request.

        Sets ``crop.pending`` to the next UNet request, or marks the crop done when its last
        stage has returned. Stages that need no model call run through at once.
        """
        while True:
            if crop.process is None:
                crop.stage_index += 1
                if crop.stage_index >= len(crop.stages):
                    crop.pending, crop.done = None, True
                    return
                crop.process = crop.stages[crop.stage_index](crop, crop.latent)
                response = None
            try:
                crop.pending = next(crop.process) if response is None else crop.process.send(response)
                return
            except StopIteration as stop:
                latent = stop.value
                if not isinstance(latent, torch.Tensor):
                    raise TypeError(f"stage {crop.stage_index} returned {type(latent).__name__}") from None
                self._synchronize()  # the check reads a device value on the host
                if not torch.isfinite(latent).all():
                    raise FloatingPointError(f"stage {crop.stage_index} produced non-finite latent values") from None
                crop.latent, crop.process, response = latent, None, None

    def _evaluate(self) -> list[EngineCrop]:
        """One UNet call per group of pending requests; returns the crops that finished."""
        groups: dict[Hashable, list[EngineCrop]] = {}
        for crop in self._active:
            groups.setdefault(crop.group_key, []).append(crop)
        finished: list[EngineCrop] = []
        for key in self.backend.order_groups(list(groups)):
            members = groups[key]
            outcomes = self._evaluate_group(key, members)
            for crop, response in zip(members, outcomes, strict=True):
                if isinstance(response, BaseException):
                    self._fail(crop, response)
                    continue
                crop.unet_evaluations += 1
                try:
                    self._next_request(crop, response)
                except Exception as error:
                    self._fail(crop, error)
                    continue
                if crop.done:
                    finished.append(crop)
        self._active = [crop for crop in self._active if not crop.done and crop.error is None]
        return finished

    def _evaluate_group(self, key: Hashable, members: list[EngineCrop]) -> list[Any]:
        calls = [(crop, crop.pending) for crop in members]
        started = time.monotonic()
        self.model_call_started = started
        try:
            responses = self.backend.evaluate(key, calls)
            self._record_call(calls, time.monotonic() - started)
            return responses
        except Exception as error:
            if len(members) == 1:
                return [error]
            logger.warning("shared UNet call of %d crops failed (%s); retrying each alone", len(members), error)
        finally:
            self.model_call_started = None
        outcomes: list[Any] = []
        for crop in members:
            outcomes.extend(self._evaluate_group(key, [crop]))
        return outcomes

    def _record_call(self, calls: Sequence[tuple[EngineCrop, Any]], seconds: float) -> None:
        rows = sum(1 + bool(getattr(request, "uncond", False)) for _, request in calls)
        with self._lock:
            self.stats.unet_batch_sizes[len(calls)] += 1
            self.stats.unet_rows += rows
            self.stats.unet_seconds += seconds
        if self.on_unet_call is not None:
            self.on_unet_call(len(calls), rows, seconds)

    def _finish(self, crops: list[EngineCrop]) -> None:
        results: dict[int, Any] = {}

        def finish(batch: Sequence[EngineCrop]) -> None:
            for crop, result in zip(batch, self.backend.finish(batch), strict=True):
                results[id(crop)] = result

        for crop in self._isolated(finish, crops):
            crop.result = results[id(crop)]
            self._resolve(crop)

    # ------------------------------------------------------------------ outcomes

    def _resolve(self, crop: EngineCrop) -> None:
        request = crop.request
        with self._lock:
            self.stats.crops_completed += 1
            request.remaining -= 1
            if request.remaining == 0 and not request.future.done():
                request.finished_at = time.monotonic()
                request.future.set_result([member.result for member in request.crops])

    def _fail(self, crop: EngineCrop, error: BaseException) -> None:
        """Fail ``crop``'s request with ``error``; its other crops are dropped at the next step."""
        crop.error = error
        self._close(crop)
        logger.warning("crop %d of a request failed: %s: %s", crop.index, type(error).__name__, error)
        with self._lock:
            self.stats.crops_failed += 1
            request = crop.request
            if not request.future.done():
                request.future.set_exception(error)
            request.cancelled = True  # its remaining crops leave at the next step
        self._active = [member for member in self._active if member is not crop]

    @staticmethod
    def _close(crop: EngineCrop) -> None:
        if crop.process is not None:
            try:
                crop.process.close()
            except Exception:  # a generator that fails on close is still gone
                logger.debug("closing a crop's sampling process failed", exc_info=True)
            crop.process = None
        crop.pending = None
        crop.latent = None
        crop.state.clear()

    def _fail_everything(self, error: BaseException) -> None:
        with self._lock:
            crops = self._queue.clear() + list(self._active)
        self._active = []
        for crop in crops:
            if not crop.request.future.done():
                crop.request.future.set_exception(RuntimeError(f"inpaint engine stopped: {error!r}"))

    # ------------------------------------------------------------------ observability

    def snapshot(self) -> dict[str, Any]:
        """JSON-able counters since start plus the current queue and active set."""
        with self._lock:
            stats = self.stats
            waits = list(stats.queue_waits)
            calls = sum(stats.unet_batch_sizes.values())
            evaluations = sum(size * count for size, count in stats.unet_batch_sizes.items())
            return {
                "unet_batch_sizes": {int(size): count for size, count in sorted(stats.unet_batch_sizes.items())},
                "unet_calls": calls,
                "unet_crop_evaluations": evaluations,
                "unet_rows": stats.unet_rows,
                "unet_seconds": round(stats.unet_seconds, 6),
                "steps": stats.steps,
                "active_crops": len(self._active),
                "queued_crops": len(self._queue),
                "max_batch_size": self.max_batch_size,
                "max_queued_crops": self.max_queued_crops,
                "torch_threads": self.torch_threads,
                "crops_submitted": stats.crops_submitted,
                "crops_completed": stats.crops_completed,
                "crops_failed": stats.crops_failed,
                "crops_cancelled": stats.crops_cancelled,
                "requests_rejected": stats.requests_rejected,
                "queue_wait_s": {
                    "count": stats.queue_wait_count,
                    "total": round(stats.queue_wait_total_s, 6),
                    "max": round(stats.queue_wait_max_s, 6),
                    "recent": [round(value, 6) for value in waits],  # chronological
                },
            }
