"""The inpainter engine's statistics, summed over every inpainter replica.

A handle call reaches one replica only, so each replica reports its engine's counters
(:meth:`InpaintEngine.snapshot`) to one small aggregator actor per inpainter deployment: a Ray
Serve *deployment-scoped actor*, created and deleted with the deployment by the Serve controller
and reached by every replica with ``serve.get_deployment_actor``. Each replica pushes its
snapshot about once a second from a background thread (so a summary lags by at most that) and
keeps the last one of every replica it has seen, so counts "since start" survive a replica's
death. The same thread feeds the Prometheus metrics, so Ray's metric calls stay off the engine
thread. The ingress's ``GET /v1/stats`` asks any inpainter replica for the summary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

STATS_ACTOR_NAME = "engine_stats"
REPORT_PERIOD_S = 1.0
LIVE_AFTER_S = 10.0  # a replica that reported within this is counted as live (active/queued crops)
UNET_BATCH_BOUNDARIES = [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64]
QUEUE_WAIT_BOUNDARIES = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class EngineStatsAggregator:
    """Keeps each replica's last engine snapshot; :meth:`summary` sums them."""

    def __init__(self) -> None:
        self.snapshots: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, replica: str, snapshot: dict[str, Any]) -> None:
        self.snapshots[replica] = (time.time(), snapshot)

    def summary(self) -> dict[str, Any]:
        return merge_snapshots(self.snapshots)


def merge_snapshots(snapshots: dict[str, tuple[float, dict[str, Any]]], now: float | None = None) -> dict[str, Any]:
    """Sum per-replica engine snapshots: counters over all replicas ever seen, gauges over live ones."""
    now = time.time() if now is None else now
    sizes: dict[int, int] = {}
    totals = {
        key: 0
        for key in (
            "unet_calls",
            "unet_crop_evaluations",
            "unet_rows",
            "steps",
            "crops_submitted",
            "crops_completed",
            "crops_failed",
            "crops_cancelled",
            "requests_rejected",
        )
    }
    unet_seconds = 0.0
    active = queued = live = 0
    wait_count, wait_total, wait_max = 0, 0.0, 0.0
    recent: list[float] = []
    for reported_at, snapshot in snapshots.values():
        for size, count in snapshot.get("unet_batch_sizes", {}).items():
            sizes[int(size)] = sizes.get(int(size), 0) + int(count)
        for key in totals:
            totals[key] += int(snapshot.get(key, 0))
        unet_seconds += float(snapshot.get("unet_seconds", 0.0))
        waits = snapshot.get("queue_wait_s", {})
        wait_count += int(waits.get("count", 0))
        wait_total += float(waits.get("total", 0.0))
        wait_max = max(wait_max, float(waits.get("max", 0.0)))
        recent.extend(waits.get("recent", []))
        if now - reported_at <= LIVE_AFTER_S:
            live += 1
            active += int(snapshot.get("active_crops", 0))
            queued += int(snapshot.get("queued_crops", 0))
    calls = totals["unet_calls"]
    return {
        "replicas_reporting": live,
        "replicas_seen": len(snapshots),
        "unet_batch_sizes": {size: sizes[size] for size in sorted(sizes)},
        **totals,
        "mean_unet_batch_size": round(totals["unet_crop_evaluations"] / calls, 3) if calls else None,
        "unet_seconds": round(unet_seconds, 3),
        "active_crops": active,
        "queued_crops": queued,
        "queue_wait_s": {
            "count": wait_count,
            "mean": round(wait_total / wait_count, 6) if wait_count else None,
            "max": round(wait_max, 6),
            "p50": _percentile(recent, 0.50),
            "p99": _percentile(recent, 0.99),
            "recent_samples": len(recent),
        },
    }


def _percentile(values: Iterable[float], fraction: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 6)


class EngineMetrics:
    """Prometheus metrics of one replica's engine (Ray prefixes the names with ``ray_``)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.unet_batch_size = metrics.Histogram(
            "facedetailer_unet_batch_size",
            description="Crops evaluated per UNet call of the inpainter engine (cond + uncond of a crop count once).",
            boundaries=UNET_BATCH_BOUNDARIES,
        )
        self.queue_wait = metrics.Histogram(
            "facedetailer_inpaint_queue_wait_s",
            description="Seconds a crop waited in the inpainter engine's queue before joining the active set.",
            boundaries=QUEUE_WAIT_BOUNDARIES,
        )
        self.active = metrics.Gauge("facedetailer_inpaint_active_crops", description="Crops being sampled.")
        self.queued = metrics.Gauge("facedetailer_inpaint_queued_crops", description="Crops waiting to be admitted.")
        self._sizes: dict[int, int] = {}
        self._waits_seen = 0

    def update(self, snapshot: dict[str, Any]) -> None:
        """Observe what happened since the previous snapshot."""
        for size, count in snapshot["unet_batch_sizes"].items():
            for _ in range(count - self._sizes.get(size, 0)):
                self.unet_batch_size.observe(size)
        self._sizes = dict(snapshot["unet_batch_sizes"])
        waits = snapshot["queue_wait_s"]
        recent = waits["recent"]  # chronological, the newest last
        new = min(waits["count"] - self._waits_seen, len(recent))
        for value in recent[len(recent) - new :] if new > 0 else []:
            self.queue_wait.observe(value)
        self._waits_seen = waits["count"]
        self.active.set(snapshot["active_crops"])
        self.queued.set(snapshot["queued_crops"])


class StatsReporter:
    """A replica's daemon thread: pushes engine snapshots to the aggregator and to Prometheus."""

    def __init__(
        self,
        replica: str,
        snapshot: Callable[[], dict[str, Any]],
        aggregator: Callable[[], Any] | None,
        metrics: EngineMetrics | None,
        period_s: float = REPORT_PERIOD_S,
    ) -> None:
        self.replica, self.snapshot, self.aggregator, self.metrics = replica, snapshot, aggregator, metrics
        self.period_s = period_s
        self._handle: Any = None
        self._stop = threading.Event()
        self._last_steps: int | None = None
        self._thread = threading.Thread(target=self._run, name="engine-stats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def push(self) -> dict[str, Any]:
        """Report now (also called by ``stats`` so a summary includes this replica's latest)."""
        snapshot = self.snapshot()
        if self.metrics is not None:
            try:
                self.metrics.update(snapshot)
            except Exception:  # metrics must never break serving
                logger.debug("engine metrics update failed", exc_info=True)
        changed = (snapshot["steps"], snapshot["crops_submitted"], snapshot["active_crops"]) != self._last_steps
        if self.aggregator is not None and changed:
            try:
                if self._handle is None:
                    self._handle = self.aggregator()
                self._handle.report.remote(self.replica, snapshot)
                self._last_steps = (snapshot["steps"], snapshot["crops_submitted"], snapshot["active_crops"])
            except Exception:  # the aggregator is being (re)created: resolve it again next time
                self._handle = None
                logger.debug("engine stats report failed", exc_info=True)
        return snapshot

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.push()


def deployment_actor_config() -> Any:
    """The aggregator as a deployment-scoped actor of the inpainter deployment (no CPU reserved)."""
    import ray
    from ray.serve.config import DeploymentActorConfig

    return DeploymentActorConfig(
        name=STATS_ACTOR_NAME,
        actor_class=ray.remote(EngineStatsAggregator),
        actor_options={"num_cpus": 0},
    )
