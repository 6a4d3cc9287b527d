#!/usr/bin/env python
"""Requests/s of the served graph at 1, 2, 4, 8, 16 concurrent HTTP clients vs one after another.

Serves a config (default ``configs/local-cpu.yaml``) on a private local Ray instance and sends
skimage's astronaut (one face) as ``POST /v1/detail?format=json`` from N client threads (httpx),
each client sending its next request as soon as the last one returns. A level runs ``--per-client``
requests per client (at least ``--min-requests``); the levels run in ``--rounds`` rounds, each
round in the opposite order of the one before (1→16, then 16→1, …), so slow drifts of the
machine's load hit every level alike; the figure of a level is the median of its rounds.
``speedup`` is a level's requests/s over the 1-client level's (sequential) of the same round.

Also recorded per level: latency p50/p95, the machine's busy cores, the load average, and the
inpainter's UNet batch sizes over the level (its engine counters, ``GET``-free through the handle).

    python benchmarks/concurrency.py --json out.json                        # tiny model, steps 4
    python benchmarks/concurrency.py --set inpainter.checkpoints=null \\
        --set inpainter.model=/path/to/sd15  --steps 4                       # full-size SD 1.5
    python benchmarks/concurrency.py --overlay configs/overlays/x.yaml      # any other settings

Run it under the heavy lock on an otherwise quiet machine (it prints the load average first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from closed_loop import closed_loop  # noqa: E402
from run_benchmarks import CpuMeter, call_with_timeout, free_port, loadavg, log, png_bytes  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "local-cpu.yaml"
DEFAULT_TINY_MODELS = REPO / ".cache" / "tests" / "tiny-models"
LEVELS = (1, 2, 4, 8, 16)


def astronaut_png() -> bytes:
    from skimage import data

    return png_bytes(np.ascontiguousarray(data.astronaut()))


class Served:
    """The app on a private Ray instance, an HTTP client pool and the inpainter's handle."""

    def __init__(self, options: argparse.Namespace) -> None:
        import httpx
        import ray
        from ray import serve

        from serve_app.cli import load_config, start_serving

        os.environ.setdefault("FACEDETAILER_TINY_MODELS", str(DEFAULT_TINY_MODELS))
        # the application's env_vars (OMP_NUM_THREADS, offline switches) reach the replicas through the
        # job's runtime_env, as start_serving does when it starts Ray itself
        [application] = load_config(options.config, options.overlay, options.set)["applications"]
        env_vars = application.get("runtime_env", {}).get("env_vars", {})
        self.env_vars = {key: str(value) for key, value in env_vars.items()}
        self.env_vars["FACEDETAILER_TINY_MODELS"] = os.environ["FACEDETAILER_TINY_MODELS"]
        started = time.perf_counter()
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": self.env_vars})
        port = free_port()
        _, port = call_with_timeout(
            lambda: start_serving(options.config, port=port, join_cluster=False, overlays=options.overlay,
                                  sets=options.set),
            900, "start_serving",
        )  # fmt: skip
        self.startup_s = time.perf_counter() - started
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=options.timeout_s, trust_env=False,
                                   limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        self.inpainter = serve.get_deployment_handle("Inpainter", app_name="facedetailer")

    def detail(self, png: bytes, params: dict[str, Any]) -> tuple[float, dict[str, float]]:
        """One request: its latency and the server's per-stage timings."""
        started = time.perf_counter()
        response = self.client.post("/v1/detail?format=json", files={"image": ("a.png", png, "image/png")},
                                    data={"params": json.dumps(params)})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        body = response.json()
        if int(body["faces_refined"]) != 1:
            raise RuntimeError("expected one refined face")
        return time.perf_counter() - started, dict(body.get("timings", {}))

    def batch_sizes(self) -> Counter:
        info = self.inpainter.info.remote().result(timeout_s=60)
        return Counter({int(k): v for k, v in info["engine"]["unet_batch_sizes"].items()})

    def close(self) -> None:
        import ray
        from ray import serve

        self.client.close()
        try:
            call_with_timeout(serve.shutdown, 120, "serve.shutdown")
        finally:
            ray.shutdown()


def own_processes() -> dict[int, str]:
    """This process and every process under it, by pid → group name (deployment, Ray part, driver).

    The private Ray instance's raylet, GCS and workers all descend from this driver; each Serve
    replica is titled ``ray::ServeReplica:<app>:<deployment>``, so the figures say which part of
    the graph spends the CPU (other engineers' Ray instances are not descendants).
    """
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    mine = {os.getpid()}
    grew = True
    while grew:
        before = len(mine)
        mine |= {pid for pid, parent in parents.items() if parent in mine}
        grew = len(mine) > before
    names: dict[int, str] = {}
    for pid in mine:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        names[pid] = "driver (clients)" if pid == os.getpid() else _group(title)
    return names


def process_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) of our processes, by group (:func:`own_processes`)."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid, name in own_processes().items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        totals[name] = totals.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return totals


def process_rss_mb() -> dict[str, float]:
    """Resident memory (MiB) of our processes, by group: what the replicas keep between requests."""
    totals: dict[str, float] = {}
    for pid, name in own_processes().items():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        totals[name] = round(totals.get(name, 0.0) + kib / 1024, 1)
    return totals


def _group(title: str) -> str:
    if title.startswith("ray::ServeReplica:"):
        return title.rsplit(":", 1)[-1].split(".")[0]  # the deployment's name (Ray appends the running method)
    if title.startswith("ray::"):
        return "ray:" + title.removeprefix("ray::").split(".")[0].split(" ")[0]
    return "ray (gcs, raylet, other)"


def run_level(served: Served, png: bytes, params: dict[str, Any], clients: int, requests: int) -> dict[str, Any]:
    """``requests`` requests from ``clients`` closed-loop client threads."""
    before = served.batch_sizes()
    cpu_before = process_cpu_seconds()
    load = loadavg()[0]
    with CpuMeter() as meter:
        answers, wall = closed_loop(clients, requests, lambda: served.detail(png, params))
    latencies = [latency for latency, _ in answers]
    stages: dict[str, list[float]] = {}
    for _, timings in answers:
        for stage, seconds in timings.items():
            stages.setdefault(stage, []).append(float(seconds))
    cpu_after = process_cpu_seconds()
    cpu = {name: (seconds - cpu_before.get(name, 0.0)) / requests for name, seconds in cpu_after.items()}
    batches = served.batch_sizes() - before
    calls = sum(batches.values())
    ordered = sorted(latencies)
    return {
        "clients": clients,
        "requests": requests,
        "wall_s": round(wall, 3),
        "requests_per_s": requests / wall,
        "latency_p50_s": statistics.median(ordered),
        "latency_p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "busy_cores": round(meter.cores, 2),
        "loadavg_1m_before": load,
        "unet_batch_sizes": dict(sorted(batches.items())),
        "mean_unet_batch": round(sum(k * v for k, v in batches.items()) / calls, 2) if calls else None,
        "stage_p50_s": {stage: round(statistics.median(values), 4) for stage, values in stages.items()},
        "cpu_s_per_request": {name: round(value, 4) for name, value in sorted(cpu.items()) if value >= 0.0005},
        "rss_mb_after": process_rss_mb(),
    }


def summarise(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per level: median requests/s and speed-up over the same round's sequential level."""
    by_level: dict[int, list[dict[str, Any]]] = {}
    for levels in rounds:
        sequential = next(level for level in levels if level["clients"] == 1)["requests_per_s"]
        for level in levels:
            by_level.setdefault(level["clients"], []).append({**level, "speedup": level["requests_per_s"] / sequential})
    rows = []
    for clients, runs in sorted(by_level.items()):
        batches: Counter = Counter()
        for run in runs:
            batches.update(run["unet_batch_sizes"])
        calls = sum(batches.values())
        rows.append({
            "clients": clients,
            "requests_per_s": statistics.median(run["requests_per_s"] for run in runs),
            "speedup": statistics.median(run["speedup"] for run in runs),
            "speedup_min": min(run["speedup"] for run in runs),
            "latency_p50_s": statistics.median(run["latency_p50_s"] for run in runs),
            "busy_cores": statistics.median(run["busy_cores"] for run in runs),
            "mean_unet_batch": round(sum(k * v for k, v in batches.items()) / calls, 2) if calls else None,
            "max_unet_batch": max(batches) if batches else None,
            "stage_p50_s": {stage: round(statistics.median(run["stage_p50_s"].get(stage, 0.0) for run in runs), 4)
                            for stage in runs[0]["stage_p50_s"]},
            "cpu_s_per_request": {name: round(statistics.median(run["cpu_s_per_request"].get(name, 0.0)
                                                                for run in runs), 4)
                                  for name in runs[0]["cpu_s_per_request"]},
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--overlay", type=Path, action="append", default=[])
    parser.add_argument("--set", action="append", default=[], help="key=value over the config (serve_app.overlay)")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-client", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup-clients", type=int, default=4, help="one level of this many requests first")
    parser.add_argument("--param", action="append", default=[], help="extra request parameter key=json")
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("--label", default="")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()

    levels = [int(value) for value in options.levels.split(",")]
    params: dict[str, Any] = {"steps": options.steps, "seed": 0}
    for item in options.param:
        key, value = item.split("=", 1)
        params[key] = json.loads(value)
    started_utc = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    conditions = {"loadavg_at_start": loadavg(), "cpus": os.cpu_count(), "started_utc": started_utc,
                  "replica_env": {key: value for item in options.set if item.startswith("app.runtime_env.env_vars.")
                                  for key, value in [item.removeprefix("app.runtime_env.env_vars.").split("=", 1)]}}
    log(f"load average {conditions['loadavg_at_start']}")
    png = astronaut_png()
    served = Served(options)
    try:
        log(f"serving after {served.startup_s:.1f} s; warming up")
        log(f"one request's stages: {served.detail(png, params)[1]}")
        warm = min(max(levels), options.warmup_clients)
        run_level(served, png, params, warm, warm)  # batched calls and their buffers once
        rounds = []
        for number in range(options.rounds):
            order = levels if number % 2 == 0 else levels[::-1]
            results = []
            for clients in order:
                requests = max(options.min_requests, options.per_client * clients)
                result = run_level(served, png, params, clients, requests)
                log(f"round {number + 1}: {clients:2d} clients {result['requests_per_s']:.3f} req/s, "
                    f"p50 {result['latency_p50_s']:.2f} s, batch {result['mean_unet_batch']}, "
                    f"{result['busy_cores']} cores busy, load {result['loadavg_1m_before']}; CPU s/request "
                    f"{result['cpu_s_per_request']}")  # fmt: skip
                results.append(result)
            rounds.append(results)
    finally:
        served.close()
    rows = summarise(rounds)
    print(f"\n{'clients':>7s} {'req/s':>7s} {'vs seq':>7s} {'(min)':>6s} {'p50 s':>6s} {'cores':>6s} {'batch':>6s}")
    for row in rows:
        print(f"{row['clients']:7d} {row['requests_per_s']:7.3f} {row['speedup']:7.2f} {row['speedup_min']:6.2f} "
              f"{row['latency_p50_s']:6.2f} {row['busy_cores']:6.2f} {row['mean_unet_batch']!s:>6s}  "
              + " ".join(f"{stage} {seconds:.3f}" for stage, seconds in row["stage_p50_s"].items()))  # fmt: skip
        print("        CPU s per request: " + ", ".join(f"{name} {value:.3f}"
                                                    for name, value in row["cpu_s_per_request"].items()))
    if rounds:
        print("RSS after the last level (MiB): " + ", ".join(f"{name} {value:.0f}"
                                                          for name, value in rounds[-1][-1]["rss_mb_after"].items()))
    conditions["loadavg_at_end"] = loadavg()
    if options.json:
        options.json.write_text(json.dumps({"label": options.label, "config": str(options.config),
                                            "sets": options.set, "overlays": [str(p) for p in options.overlay],
                                            "params": params, "conditions": conditions, "summary": rows,
                                            "rounds": rounds}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
