"""Several checkpoints on one inpainter replica: Ray Serve model multiplexing (issue 12 part 3).

A service configures checkpoints by name (``args.inpainter.checkpoints``); a request names one
with ``model`` and the ingress routes it with ``handle.options(multiplexed_model_id=name)``, so
Ray Serve sends it to a replica that already has that checkpoint loaded when there is one. A
replica keeps at most ``max_models_per_replica`` checkpoints and evicts the least recently used
one to load another (``@serve.multiplexed``).

Each loaded checkpoint is a :class:`LoadedCheckpoint`: its own :class:`~deployments.inpainter.Inpainter`
with its own engine loop. So crops of different checkpoints can never share a UNet batch (they
live in different engines), while crops of the same checkpoint share calls whatever their
settings. Evicting a checkpoint first lets the requests that already hold it finish, then stops
its engine and drops its weights.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from deployments.inpainter import Inpainter, RefineJob, RefineResult, SamplingSettings, result_of
from deployments.inpainter_engine import CropProgress

logger = logging.getLogger("ray.serve")

DEFAULT_CHECKPOINT = "default"
DRAIN_TIMEOUT_S = 900.0


CHECKPOINT_OPTIONS = (
    "model", "single_file_config", "diffusion_model", "text_encoders", "vae", "family", "prediction", "zsnr", "shift",
    "precision",
)  # fmt: skip
# a checkpoint's opt-in ``precision`` → the inpainter's dtype (it overrides the deployment's ``dtype``)
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_options(spec: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~deployments.inpainter.Inpainter` keyword arguments of one checkpoint: its spec over ``options``.

    ``precision`` (fp32, bf16, fp16) becomes the run ``dtype`` of that checkpoint alone.
    """
    merged = {**options, **{key: value for key, value in spec.items() if key != "precision"}}
    precision = spec.get("precision")
    if precision is not None:
        if precision not in PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, got {precision!r}")
        merged["dtype"] = PRECISION_DTYPES[precision]
    return merged


def checkpoint_specs(
    model: str | Mapping[str, Any], single_file_config: str | None = None
) -> dict[str, dict[str, Any]]:
    """``{name: {"model": reference, "single_file_config": ..., ...}}`` from either config form.

    A plain reference is the single ``model`` form: one checkpoint named ``default``. A named
    checkpoint keeps the :class:`~deployments.inpainter.Inpainter` options it sets (folder or
    single file, or the split layout, and the family/model-sampling overrides).
    """
    if isinstance(model, str):
        return {DEFAULT_CHECKPOINT: {"model": model, "single_file_config": single_file_config}}
    specs: dict[str, dict[str, Any]] = {}
    for name, spec in model.items():
        spec = {"model": spec} if isinstance(spec, str) else dict(spec)
        unknown = set(spec) - set(CHECKPOINT_OPTIONS)
        if unknown:
            raise ValueError(f"checkpoint {name!r}: unknown options {', '.join(sorted(unknown))}")
        specs[name] = {key: value for key, value in spec.items() if value is not None}
        specs[name].setdefault("single_file_config", None)
    if not specs:
        raise ValueError("checkpoints: name at least one")
    return specs


class LoadedCheckpoint:
    """One checkpoint on a replica: its inpainter, its engine thread, the requests using it."""

    def __init__(self, name: str, inpainter: Inpainter) -> None:
        self.name, self.inpainter, self.engine = name, inpainter, inpainter.engine
        self.inflight = 0
        self.retired = False
        self._lock = threading.Lock()
        self.engine.start(name=f"inpaint-engine-{name}")
        # Ray Serve's LRU eviction calls the model's ``__del__`` attribute (in an executor thread).
        # An instance attribute, so garbage collection never runs the (blocking) drain.
        self.__del__ = self.retire

    async def refine(
        self,
        jobs: Sequence[RefineJob],
        settings: SamplingSettings | None,
        *,
        tenant: str = "",
        weight: float = 1.0,
        on_progress: Callable[[CropProgress], None] | None = None,
    ) -> RefineResult:
        with self._lock:  # counted before anything else, so an eviction waits for this request
            self.inflight += 1
        try:
            payloads = self.inpainter.payloads(list(jobs), settings)  # bad crops and settings fail here, alone
            request = self.engine.submit(payloads, tenant=tenant, weight=weight, on_progress=on_progress)
            try:
                images = await asyncio.wrap_future(request.future)
            except asyncio.CancelledError:
                self.engine.cancel(request)
                raise
            return result_of(request, images)
        finally:
            with self._lock:
                self.inflight -= 1

    def retire(self, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Let the requests that hold this checkpoint finish (up to ``timeout_s``), then stop its engine."""
        if self.retired:
            return
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.inflight:
            logger.warning("checkpoint %s evicted with %d requests still running", self.name, self.inflight)
        self.engine.stop()
        self.retired = True
        logger.info("checkpoint %s unloaded", self.name)


    def release(self) -> None:
        """Drop the (retired) checkpoint's weights: accelerator memory is free for the next one."""
        self.inpainter = self.engine = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sum_snapshots(snapshots: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One replica's engine snapshot from the snapshots of its checkpoints' engines (same keys)."""
    if len(snapshots) == 1:
        return snapshots[0]
    sizes: dict[int, int] = {}
    counters = (
        "unet_calls", "unet_crop_evaluations", "unet_rows", "steps", "active_crops", "queued_crops",
        "crops_submitted", "crops_completed", "crops_failed", "crops_cancelled", "requests_rejected",
    )  # fmt: skip
    total: dict[str, Any] = {key: 0 for key in counters}
    seconds = 0.0
    waits = {"count": 0, "total": 0.0, "max": 0.0, "recent": []}
    for snapshot in snapshots:
        for size, count in snapshot["unet_batch_sizes"].items():
            sizes[int(size)] = sizes.get(int(size), 0) + int(count)
        for key in counters:
            total[key] += snapshot[key]
        seconds += snapshot["unet_seconds"]
        wait = snapshot["queue_wait_s"]
        waits["count"] += wait["count"]
        waits["total"] = round(waits["total"] + wait["total"], 6)
        waits["max"] = max(waits["max"], wait["max"])
        waits["recent"] += wait["recent"]
    return {
        **total,
        "unet_batch_sizes": dict(sorted(sizes.items())),
        "unet_seconds": round(seconds, 6),
        "max_batch_size": snapshots[0]["max_batch_size"] if snapshots else 0,
        "max_queued_crops": snapshots[0]["max_queued_crops"] if snapshots else 0,
        "queue_wait_s": waits,
    }
