"""A multi-node Ray cluster on one machine serving configs/gpu.yaml's graph on simulated GPUs.

Shared by ``tests/cluster/`` and ``benchmarks/scaling.py``. ``ray.cluster_utils.Cluster`` (Ray's
own multi-node test harness) starts a head and two worker nodes; each worker declares one
logical GPU (no physical GPU is needed) and a few CPUs. The application is ``gpu.yaml`` — the
same deployments, GPU fractions, autoscaling blocks and limits — through the documented
overlay feature: ``configs/overlays/simulated-cpu.yaml`` swaps the models for ``sim://`` stand-ins
on CPU, and ``--set`` values shorten the autoscaling delays (seconds instead of minutes), pick a
free port and keep the ingress on the head node (see :data:`CLUSTER_SETS`).

Replicas are scheduled with Serve's PACK strategy (``RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1``,
best fit), which is what puts detector 0.1 + SAM 0.2 + inpainter 0.7 on one GPU; Serve's default
SPREAD strategy would start the first replica of each deployment on different nodes.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIG = REPO / "configs" / "gpu.yaml"
SIMULATED_OVERLAY = REPO / "configs" / "overlays" / "simulated-cpu.yaml"
APP_NAME = "facedetailer"
MODEL_DEPLOYMENTS = ("Detector", "Sam", "Inpainter")
CPU_GROUP = "cpu_group"  # a custom resource only the head declares: the ingress stays off GPU nodes
HEAD_CPUS, WORKER_CPUS, WORKER_GPUS = 4, 8, 1
# Serve's autoscaler in seconds, not minutes: the same policy, rehearsed quickly.
FAST_AUTOSCALING = {"upscale_delay_s": 1, "downscale_delay_s": 6, "look_back_period_s": 3, "metrics_interval_s": 0.5}
CLUSTER_ENV = {"RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_sets(port: int) -> list[str]:
    """The ``--set`` values the rehearsal adds to ``gpu.yaml`` + the simulated overlay."""
    sets = [f"serve.http_options.port={port}", f"ingress.ray_actor_options.resources={{{CPU_GROUP}: 0.01}}"]
    for part in ("detector.deployment", "sam.deployment", "inpainter.deployment"):
        sets += [f"{part}.autoscaling_config.{key}={value}" for key, value in FAST_AUTOSCALING.items()]
    return sets


@dataclass
class SimulatedCluster:
    """A running cluster with the application deployed; see :func:`simulated_cluster`."""

    cluster: Any
    workers: list[Any]
    url: str
    config: dict[str, Any]

    def replica_states(self) -> dict[str, dict[str, int]]:
        """{deployment: {state: count}} from Serve's status (RUNNING, STARTING, PENDING_ALLOCATION, …)."""
        from ray import serve

        application = serve.status().applications.get(APP_NAME)
        if application is None:
            return {}
        return {name: dict(status.replica_states) for name, status in application.deployments.items()}

    def running(self, deployment: str) -> int:
        return self.replica_states().get(deployment, {}).get("RUNNING", 0)

    def placements(self, deployment: str, deadline_s: float = 30.0) -> list[dict[str, Any]]:
        """Each RUNNING replica's node and logical GPU ids, asked of the replicas themselves.

        Calls that fail (a replica that just died) are skipped; asks until every RUNNING replica
        answered or the deadline passes.
        """
        from ray import serve

        handle = serve.get_deployment_handle(deployment, app_name=APP_NAME)
        found: dict[str, dict[str, Any]] = {}
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            wanted = self.running(deployment)
            for _ in range(max(4, 4 * wanted)):
                try:
                    placement = handle.placement.remote().result(timeout_s=max(min(end - time.monotonic(), 10), 1))
                except Exception:  # a dead or stopping replica; the router moves on
                    continue
                found[placement["replica"]] = placement
            if wanted and len(found) >= wanted:
                break
        return list(found.values())

    def all_on(self, node_id: str) -> bool:
        """Every model deployment has a running replica, and every replica answering is on ``node_id``."""
        for deployment in MODEL_DEPLOYMENTS:
            if self.running(deployment) < 1:
                return False
            placements = self.placements(deployment, deadline_s=10)
            if not placements or any(p["node_id"] != node_id for p in placements):
                return False
        return True

    def node_of(self, node_id: str) -> Any:
        return next(worker for worker in self.workers if worker.node_id == node_id)


def wait_until(condition: Callable[[], bool], deadline_s: float, interval_s: float = 0.5, what: str = "") -> float:
    """Poll ``condition`` until true; return the seconds it took; raise TimeoutError naming ``what``."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > deadline_s:
            raise TimeoutError(f"not within {deadline_s:.0f} s: {what}")
        time.sleep(interval_s)


def healthz(url: str, timeout_s: float = 15.0) -> int:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=timeout_s, trust_env=False).status_code
    except httpx.HTTPError:
        return 0


@contextmanager
def simulated_cluster(
    extra_sets: list[str] | None = None, start_deadline_s: float = 420.0
) -> Iterator[SimulatedCluster]:
    """Start the cluster and deploy the application; shut everything down on exit."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.cli import _application, load_config, start_serving

    if ray.is_initialized():
        raise RuntimeError("a Ray instance is already connected in this process; the cluster needs its own")
    port = free_port()
    sets = cluster_sets(port) + list(extra_sets or [])
    config = load_config(GPU_CONFIG, [SIMULATED_OVERLAY], sets)
    env_vars = {key: str(value) for key, value in _application(config)["runtime_env"]["env_vars"].items()}
    saved = dict(os.environ)  # start_serving also exports the application's env_vars here
    os.environ.update(CLUSTER_ENV)  # inherited by every Ray process the Cluster starts
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": HEAD_CPUS,
            "num_gpus": 0,
            "resources": {CPU_GROUP: 1},
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    try:
        workers = [
            cluster.add_node(num_cpus=WORKER_CPUS, num_gpus=WORKER_GPUS)
            for _ in range(2)
        ]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
        # start_serving joins the initialised Ray and deploys the overlaid config, as `facedetailer serve` does
        start_serving(GPU_CONFIG, overlays=[SIMULATED_OVERLAY], sets=sets)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthz(url) == 200, start_deadline_s, 2.0, "the application answers /healthz 200")
        yield SimulatedCluster(cluster=cluster, workers=workers, url=url, config=config)
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            os.environ.clear()
            os.environ.update(saved)


@contextmanager
def gpu_nodes(workers: int = 2, worker_cpus: int = WORKER_CPUS) -> Iterator[Any]:
    """A head (no GPU) and ``workers`` nodes with one logical GPU each, this process connected; no
    application deployed (bulk jobs run their own actors: tests/batch, benchmarks/batch.py).
    Yields the ``Cluster``; shuts everything down on exit."""
    import ray
    from ray.cluster_utils import Cluster

    from serve_app.batch.job import load_app_config

    if ray.is_initialized():
        raise RuntimeError("a Ray instance is already connected in this process; the cluster needs its own")
    _, env_vars = load_app_config(GPU_CONFIG, [SIMULATED_OVERLAY])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": HEAD_CPUS, "num_gpus": 0, "resources": {CPU_GROUP: 1}, "include_dashboard": False},
    )
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=worker_cpus, num_gpus=WORKER_GPUS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


# ---------------------------------------------------------------------------- load


def sample_image(seed: int = 0, size: int = 256) -> bytes:
    """A textured PNG: the simulated detector finds its face in the most textured grid cell."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 110, np.uint8)
    half = size // 2
    image[half:, half:] = rng.integers(0, 256, (size - half, size - half, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# An inpainter-heavy request: one 512×512 crop, 20 steps (≈ 20 × 45 ms of modelled A100 time).
INPAINT_HEAVY = {"steps": 20, "guide_size": 512, "max_size": 512, "seed": 1}
# A SAM-heavy request: SAM's 0.45 s image embedding, then one 128×128 crop for 1 step.
SAM_HEAVY = {"steps": 1, "guide_size": 128, "max_size": 128, "use_sam": True, "seed": 1}


@dataclass
class RequestRecord:
    client: int
    started: float
    ended: float
    status: int  # 0: no HTTP answer (connection error or client timeout)
    retry_after: str | None
    error: str | None = None
    attempts: int = 1

    @property
    def latency(self) -> float:
        return self.ended - self.started


@dataclass
class LoadRun:
    """Closed-loop clients (each sends its next request when the last one ends) over HTTP."""

    url: str
    params: dict[str, Any]
    request_timeout_s: float = 90.0
    retry_on_503: bool = False
    requests_per_client: int | None = None  # None: until stopped
    records: list[RequestRecord] = field(default_factory=list)
    epoch: float = field(default_factory=time.monotonic)
    _target: int = 0
    _stop: bool = False
    _finished: set[int] = field(default_factory=set)
    _thread: threading.Thread | None = None

    def set_clients(self, count: int) -> None:
        self._target = count

    def start(self, clients: int = 0) -> LoadRun:
        self._target = clients
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def stop(self, deadline_s: float = 120.0) -> None:
        """Stop starting requests and wait for the ones in flight (each bounded by its timeout)."""
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=deadline_s)
            if self._thread.is_alive():
                raise TimeoutError("the load clients did not finish within the deadline")

    def now(self) -> float:
        return time.monotonic() - self.epoch

    async def _run(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=self.url, timeout=self.request_timeout_s, limits=limits, trust_env=False
        ) as http:
            tasks: dict[int, asyncio.Task[None]] = {}
            while not self._stop:
                for client, task in list(tasks.items()):
                    if task.done():
                        del tasks[client]
                for client in range(self._target):
                    if client not in tasks and client not in self._finished:
                        tasks[client] = asyncio.create_task(self._client(http, client))
                await asyncio.sleep(0.1)
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def _client(self, http: Any, client: int) -> None:
        """Request after request while this client is within the target count (ramps finish the current one)."""
        image = sample_image(client)
        sent = 0
        while not self._stop and client < self._target:
            if self.requests_per_client is not None and sent >= self.requests_per_client:
                self._finished.add(client)
                return
            self.records.append(await self._request(http, client, image))
            sent += 1

    def done(self) -> bool:
        """Every client sent its ``requests_per_client`` (always False for open-ended runs)."""
        if self.requests_per_client is None:
            return False
        return len(self.records) >= self._target * self.requests_per_client

    async def _request(self, http: Any, client: int, image: bytes) -> RequestRecord:
        started = self.now()
        attempts = 0
        while True:
            attempts += 1
            try:
                response = await http.post(
                    "/v1/detail",
                    files={"image": ("image.png", image, "image/png")},
                    data={"params": json.dumps(self.params)},
                )
                status, retry_after, error = response.status_code, response.headers.get("retry-after"), None
                if status != 200:
                    error = response.text[:300]
            except Exception as exc:  # httpx timeouts and connection errors: a hang or a dropped request
                status, retry_after, error = 0, None, f"{type(exc).__name__}: {exc}"[:300]
            if self.retry_on_503 and status in (429, 503) and retry_after and not self._stop:
                await asyncio.sleep(min(float(retry_after), 2.0))
                continue
            return RequestRecord(client, started, self.now(), status, retry_after, error, attempts)


@dataclass
class ReplicaSampler:
    """Samples RUNNING replicas per deployment every ``interval_s`` in a thread."""

    cluster: SimulatedCluster
    epoch: float
    interval_s: float = 0.5
    watch_health: bool = False  # also poll /healthz (its own thread)
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    health: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _health_thread: threading.Thread | None = None

    def start(self) -> ReplicaSampler:
        def health_loop() -> None:
            while not self._stop.is_set():
                status = healthz(self.cluster.url, timeout_s=20.0)
                self.health.append((time.monotonic() - self.epoch, status))
                self._stop.wait(self.interval_s)

        if self.watch_health:
            self._health_thread = threading.Thread(target=health_loop, daemon=True)
            self._health_thread.start()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    states = self.cluster.replica_states()
                    running = {name: counts.get("RUNNING", 0) for name, counts in states.items()}
                    self.samples.append((time.monotonic() - self.epoch, running))
                except Exception:  # the controller busy or restarting: skip a sample
                    pass
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._health_thread):
            if thread is not None:
                thread.join(timeout=30)

    def healthy_again(self, after: float) -> float | None:
        """When /healthz answered 200 again after first failing past ``after`` (None: never failed or never back)."""
        failed = False
        for moment, status in self.health:
            if moment < after:
                continue
            if status != 200:
                failed = True
            elif failed:
                return moment
        return None

    def first_time(self, deployment: str, predicate: Callable[[int], bool], after: float = 0.0) -> float | None:
        for moment, running in self.samples:
            if moment >= after and predicate(running.get(deployment, 0)):
                return moment
        return None

    def peak(self, deployment: str, start: float = 0.0, end: float = float("inf")) -> int:
        return max((running.get(deployment, 0) for moment, running in self.samples if start <= moment <= end),
                   default=0)
