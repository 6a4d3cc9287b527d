"""Chaos for a served application: kill model replicas, load it with locust, watch memory, count answers.

Shared by ``tests/serve/test_replica_loss.py`` (single kills and a short chaos run in the suite)
and ``benchmarks/chaos.py`` (10-minute runs written up in docs/reliability.md). Needs a connected
Ray driver (the process that started Ray: its descendants are the processes measured).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "benchmarks" / "locustfile.py"
VALID_KINDS = ("detail", "detail_stream")
KILL_METHODS = ("ray.kill", "SIGKILL")


# ---------------------------------------------------------------------------- replicas


def replica_activity(app: str, deployment: str) -> dict[str, Any]:
    """One replica's placement, pid and running model calls (``activity()``; the router picks the replica)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    return handle.activity.remote().result(timeout_s=30)


def replicas_of(app: str, deployment: str, deadline_s: float = 20.0) -> list[dict[str, Any]]:
    """Every RUNNING replica's activity, asked until each answered (or the deadline)."""
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    wanted = status.replica_states.get("RUNNING", 0)
    found: dict[str, dict[str, Any]] = {}
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and len(found) < max(wanted, 1):
        try:
            activity = replica_activity(app, deployment)
        except Exception:  # a replica dying right now: ask again
            time.sleep(0.2)
            continue
        found[activity["replica"]] = activity
    return list(found.values())


def wait_for_running_call(app: str, deployment: str, deadline_s: float = 60.0) -> dict[str, Any]:
    """The activity of a replica once a model call runs on it (single-replica deployments)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            activity = replica_activity(app, deployment)
        except Exception:
            activity = {"running_calls": 0}
        if activity["running_calls"] > 0:
            return activity
        time.sleep(0.05)
    raise TimeoutError(f"no call ran on {app}/{deployment} within {deadline_s} s")


def kill_replica(app: str, deployment: str, replica: dict[str, Any], method: str = "ray.kill") -> None:
    """Kill one replica: ``ray.kill`` of its actor (no restart: Serve starts a new one) or SIGKILL of its process."""
    import ray

    if method == "SIGKILL":
        os.kill(replica["pid"], signal.SIGKILL)
        return
    actor = ray.get_actor(f"SERVE_REPLICA::{app}#{deployment}#{replica['replica']}", namespace="serve")
    ray.kill(actor, no_restart=True)


@dataclass
class KillRecord:
    at: float  # time.time()
    deployment: str
    replica: str
    method: str
    running_calls: int


@dataclass
class RandomKiller:
    """Kills a replica of a random model deployment every ``interval_s`` (uniform) seconds, in a thread:
    one in the middle of a model call when there is one, else any (``ray.kill`` and SIGKILL in turn)."""

    app: str
    deployments: Sequence[str]
    interval_s: tuple[float, float] = (20.0, 60.0)
    busy_wait_s: float = 10.0  # how long to look for a replica in the middle of a call
    seed: int = 0
    kills: list[KillRecord] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RandomKiller:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _victim(self, deployment: str, chooser: random.Random) -> dict[str, Any]:
        """A replica of ``deployment`` running a call if one does within ``busy_wait_s``, else any."""
        end = time.monotonic() + self.busy_wait_s
        while True:
            replicas = replicas_of(self.app, deployment)
            busy = [replica for replica in replicas if replica["running_calls"] > 0]
            if busy or time.monotonic() > end or self._stop.is_set():
                return chooser.choice(busy or replicas)
            time.sleep(0.1)

    def _loop(self) -> None:
        chooser = random.Random(self.seed)
        while not self._stop.wait(chooser.uniform(*self.interval_s)):
            deployment = chooser.choice(list(self.deployments))
            method = KILL_METHODS[len(self.kills) % len(KILL_METHODS)]
            try:
                replica = self._victim(deployment, chooser)
                kill_replica(self.app, deployment, replica, method)
                self.kills.append(KillRecord(time.time(), deployment, replica["replica"], method,
                                             replica["running_calls"]))  # fmt: skip
            except Exception as error:  # a replica already gone, the controller busy: try at the next tick
                self.failures.append(f"{deployment}: {type(error).__name__}: {error}"[:300])


# ---------------------------------------------------------------------------- memory


def ray_processes(root: int | None = None) -> dict[int, str]:
    """``{pid: role}`` of the Ray processes under ``root`` (default: this driver), by process title.

    Roles: ``ServeController``, ``ProxyActor``, ``ServeReplica:<app>:<deployment>``, Serve's
    deployment actors (by class), and Ray's own ``gcs_server`` / ``raylet``; idle workers are left out.
    """
    import psutil

    found: dict[int, str] = {}
    for process in psutil.Process(root or os.getpid()).children(recursive=True):
        try:
            command = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if not command:
            continue
        title = command[0]
        if title.startswith("ray::"):
            role = title[len("ray::"):].split(" ")[0].split(".")[0]  # "ray::ProxyActor.ready()" while busy
            if role != "IDLE":
                found[process.pid] = role
        elif os.path.basename(title) in ("gcs_server", "raylet"):
            found[process.pid] = os.path.basename(title)
    return found


def memory_snapshot(root: int | None = None) -> list[dict[str, Any]]:
    """RSS (MiB) of every Ray process of this session, with its role and pid."""
    import psutil

    rows = []
    for pid, role in sorted(ray_processes(root).items(), key=lambda item: (item[1], item[0])):
        try:
            rss = psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
        rows.append({"role": role, "pid": pid, "rss_mib": round(rss / 2**20, 1)})
    return rows


@dataclass
class MemorySampler:
    """Samples :func:`memory_snapshot` every ``interval_s`` in a thread."""

    interval_s: float = 15.0
    samples: list[tuple[float, list[dict[str, Any]]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        def loop() -> None:
            while True:
                self.samples.append((time.time(), memory_snapshot()))
                if self._stop.wait(self.interval_s):
                    return

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.samples.append((time.time(), memory_snapshot()))


# ---------------------------------------------------------------------------- load


@dataclass
class LocustRun:
    """``benchmarks/locustfile.py`` headless in a subprocess; its per-request records read back."""

    host: str
    records_path: Path
    users: int = 4
    spawn_rate: float = 4.0
    duration_s: float = 30.0
    keys: dict[str, str] = field(default_factory=dict)
    admin_keys: Sequence[str] = ()
    params: dict[str, Any] | None = None
    image: Path | None = None
    timeout_s: float = 300.0
    wait_s: tuple[float, float] = (0.5, 2.0)
    stop_timeout_s: float = 300.0  # at the end, requests in flight are answered, not cut by the client
    process: subprocess.Popen | None = None

    def start(self) -> LocustRun:
        self.records_path.unlink(missing_ok=True)
        env = dict(os.environ)
        env.update(
            FD_RECORDS=str(self.records_path),
            FD_KEYS=json.dumps(self.keys),
            FD_ADMIN_KEYS=json.dumps(list(self.admin_keys)),
            FD_TIMEOUT_S=str(self.timeout_s),
            FD_WAIT_S=f"{self.wait_s[0]},{self.wait_s[1]}",
        )
        if self.params is not None:
            env["FD_PARAMS"] = json.dumps(self.params)
        if self.image is not None:
            env["FD_IMAGE"] = str(self.image)
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "-u", str(self.users), "-r", str(self.spawn_rate), "-t", f"{int(self.duration_s)}s",
            "--stop-timeout", str(int(self.stop_timeout_s)), "--host", self.host, "--loglevel", "WARNING",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return self

    def wait(self) -> str:
        """Wait for locust to finish (duration + the requests in flight); its summary output."""
        assert self.process is not None
        output, _ = self.process.communicate(timeout=self.duration_s + self.stop_timeout_s + 120)
        return output

    def records(self) -> list[dict[str, Any]]:
        if not self.records_path.exists():
            return []
        return [json.loads(line) for line in self.records_path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- summaries


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Status codes, 5xx, lost (no answer), unexpected answers, latency of the valid requests, per key."""
    statuses = Counter(record["status"] for record in records)
    ok = [record["latency"] for record in records if record["kind"] in VALID_KINDS and record["status"] == 200]
    by_kind: dict[str, dict[str, int]] = {}
    for record in records:
        by_kind.setdefault(record["kind"], Counter())[str(record["status"])] += 1  # type: ignore[index]
    keys: dict[str, dict[str, Any]] = {}
    for key in sorted({record["key"] for record in records}):
        valid = [record for record in records if record["key"] == key and record["kind"] in VALID_KINDS]
        latencies = [record["latency"] for record in valid if record["status"] == 200]
        keys[key] = {
            "valid_requests": len(valid),
            "ok": len(latencies),
            "refused_429": sum(record["status"] == 429 for record in valid),
            "p50_s": percentile(latencies, 0.5),
            "p99_s": percentile(latencies, 0.99),
        }
    return {
        "requests": len(records),
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "server_errors": sum(count for status, count in statuses.items() if status >= 500),
        "lost": statuses.get(0, 0),
        "unexpected": [record for record in records if not record["expected"]][:20],
        "unexpected_count": sum(not record["expected"] for record in records),
        "valid_ok": len(ok),
        "p50_s": percentile(ok, 0.5),
        "p99_s": percentile(ok, 0.99),
        "by_kind": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
        "keys": keys,
    }


def wait_until(condition: Callable[[], bool], deadline_s: float, interval_s: float = 0.5, what: str = "") -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > deadline_s:
            raise TimeoutError(f"not within {deadline_s:.0f} s: {what}")
        time.sleep(interval_s)
    return time.monotonic() - started
