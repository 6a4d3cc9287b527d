"""Scaling benchmark: configs/gpu.yaml's graph on a 3-node simulated-GPU cluster, written to docs/scaling.md.

The cluster and application are the ones tests/cluster/ runs (tests/cluster/harness.py): a head
and two workers with one logical GPU each, gpu.yaml through the simulated overlay (sim:// models
with published A100 costs, autoscaling delays in seconds). Three runs, every wait bounded:

1. **Ramp**: closed-loop HTTP clients 0 → 16 (20 s) → hold (40 s) → 0 (20 s) → idle; each
   request refines one 512×512 crop for 20 steps. Replicas per deployment sampled every 0.5 s.
2. **SAM-heavy**: 16 clients whose requests spend most of their time in SAM.
3. **Node loss**: 6 clients, plus 2 clients that retry on 503/429 after Retry-After, then
   ``cluster.remove_node`` of the worker holding the packed GPU. The ingress sends the calls
   whose replicas died again (serve_app/model_calls.py): the clients that do not retry should
   see only 200s.

Writes ``docs/scaling.md``, ``docs/scaling.png`` (matplotlib) and ``benchmarks/scaling.json``.
Run under the heavy-command lock on an otherwise idle machine (about 5 minutes):

    /work/wt/heavy .venv/bin/python benchmarks/scaling.py
    .venv/bin/python benchmarks/scaling.py --runs node_loss   # re-run one part, keep the others' figures
    .venv/bin/python benchmarks/scaling.py --render-from benchmarks/scaling.json   # re-render only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.harness import (  # noqa: E402
    FAST_AUTOSCALING,
    INPAINT_HEAVY,
    MODEL_DEPLOYMENTS,
    SAM_HEAVY,
    LoadRun,
    ReplicaSampler,
    SimulatedCluster,
    healthz,
    simulated_cluster,
    wait_until,
)

WINDOW_S = 5.0


def ramp(run: LoadRun, start: int, end: int, seconds: float, timeline: list[tuple[float, int]]) -> None:
    steps = max(abs(end - start), 1)
    for index in range(1, steps + 1):
        count = start + (index if end > start else -index)
        run.set_clients(count)
        timeline.append((run.now(), count))
        time.sleep(seconds / steps)


def records_json(run: LoadRun) -> list[dict[str, Any]]:
    return [
        {"started": r.started, "ended": r.ended, "status": r.status, "retry_after": r.retry_after,
         "attempts": r.attempts, "error": r.error}
        for r in run.records
    ]


def first_after(samples: list[list[Any]], deployment: str, predicate: Any, after: float) -> float | None:
    for moment, running in samples:
        if moment >= after and predicate(running.get(deployment, 0)):
            return moment
    return None


def run_ramp(cluster: SimulatedCluster) -> dict[str, Any]:
    run = LoadRun(cluster.url, INPAINT_HEAVY)
    sampler = ReplicaSampler(cluster, run.epoch).start()
    clients: list[tuple[float, int]] = [(0.0, 0)]
    run.start(0)
    try:
        ramp(run, 0, 16, 20.0, clients)
        time.sleep(40.0)
        load_ends = run.now()
        ramp(run, 16, 0, 20.0, clients)
        run.stop()
        idle_from = run.now()
        wait_until(lambda: cluster.running("Inpainter") == 1, 180, what="back to one inpainter")
        time.sleep(5)
    finally:
        run.stop()
        sampler.stop()
    samples = [[moment, running] for moment, running in sampler.samples]
    up = first_after(samples, "Inpainter", lambda n: n >= 2, 0.0)
    down = first_after(samples, "Inpainter", lambda n: n == 1, idle_from)
    return {
        "records": records_json(run),
        "samples": samples,
        "clients": clients,
        "load_ends": load_ends,
        "idle_from": idle_from,
        "scale_up_s": up,  # from the first client
        "scale_down_s": None if down is None else down - idle_from,  # from the last request's end
        "peak": {name: sampler.peak(name) for name in MODEL_DEPLOYMENTS},
    }


def run_sam_heavy(cluster: SimulatedCluster) -> dict[str, Any]:
    wait_until(lambda: cluster.running("Sam") == 1 and cluster.running("Inpainter") == 1, 180, what="at rest")
    run = LoadRun(cluster.url, SAM_HEAVY)
    sampler = ReplicaSampler(cluster, run.epoch).start()
    run.start(16)
    try:
        time.sleep(40.0)
        run.stop()
        idle_from = run.now()
        wait_until(lambda: cluster.running("Sam") == 1, 180, what="back to one SAM replica")
    finally:
        run.stop()
        sampler.stop()
    samples = [[moment, running] for moment, running in sampler.samples]
    up = first_after(samples, "Sam", lambda n: n >= 2, 0.0)
    down = first_after(samples, "Sam", lambda n: n == 1, idle_from)
    return {
        "records": records_json(run),
        "samples": samples,
        "scale_up_s": up,
        "scale_down_s": None if down is None else down - idle_from,
        "peak": {name: sampler.peak(name, 0, idle_from) for name in MODEL_DEPLOYMENTS},
    }


def run_node_loss(cluster: SimulatedCluster) -> dict[str, Any]:
    load_before = [round(value, 2) for value in os.getloadavg()]
    [inpainter] = cluster.placements("Inpainter")
    victim = cluster.node_of(inpainter["node_id"])
    survivor = next(worker for worker in cluster.workers if worker is not victim)
    load = LoadRun(cluster.url, INPAINT_HEAVY, request_timeout_s=120)
    retrying = LoadRun(cluster.url, INPAINT_HEAVY, request_timeout_s=120, retry_on_503=True, requests_per_client=10)
    retrying.epoch = load.epoch
    sampler = ReplicaSampler(cluster, load.epoch, watch_health=True).start()
    load.start(6)
    retrying.start(2)
    try:
        time.sleep(15.0)
        removed_at = load.now()
        cluster.cluster.remove_node(victim, allow_graceful=False)
        wait_until(lambda: cluster.all_on(survivor.node_id), 180, 1.0, "every model running on the survivor")
        recovered_at = load.now()
        time.sleep(20.0)
        load.stop(deadline_s=180)
        wait_until(retrying.done, 300, 1.0, "the retrying clients finished")
        retrying.stop(deadline_s=60)
        wait_until(lambda: healthz(cluster.url) == 200, 120, 2.0, "/healthz 200")
    finally:
        load.stop(deadline_s=180)
        retrying.stop(deadline_s=180)
        sampler.stop()
    return {
        "records": records_json(load),
        "retrying_records": records_json(retrying),
        "samples": [[moment, running] for moment, running in sampler.samples],
        "removed_at": removed_at,
        "recovered_s": recovered_at - removed_at,
        "health": sampler.health,
        "unhealthy_from_s": next((m - removed_at for m, status in sampler.health if m >= removed_at and status != 200),
                                 None),
        "healthy_s": None if (back := sampler.healthy_again(removed_at)) is None else back - removed_at,
        "placements_after": {name: cluster.placements(name) for name in MODEL_DEPLOYMENTS},
        "survivor": survivor.node_id,
        "load_average": {"before": load_before, "after": [round(value, 2) for value in os.getloadavg()]},
    }


RUNS = {"ramp": run_ramp, "sam_heavy": run_sam_heavy, "node_loss": run_node_loss}

# ---------------------------------------------------------------------------- rendering


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def latency_windows(records: list[dict[str, Any]], end: float) -> list[tuple[float, float, float, int]]:
    """(window centre, p50, p99, requests) of 200s by the time they ended."""
    windows = []
    start = 0.0
    while start < end:
        latencies = [r["ended"] - r["started"] for r in records if start <= r["ended"] < start + WINDOW_S
                     and r["status"] == 200]
        if latencies:
            windows.append((start + WINDOW_S / 2, percentile(latencies, 0.5), percentile(latencies, 0.99),
                            len(latencies)))
        start += WINDOW_S
    return windows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ramp_run, loss = results["ramp"], results["node_loss"]
    figure, axes = plt.subplots(2, 2, figsize=(13, 8), sharex="col")
    colours = {"Inpainter": "tab:red", "Sam": "tab:green", "Detector": "tab:blue"}

    def replicas(axis: Any, samples: list[list[Any]], title: str) -> None:
        times = [moment for moment, _ in samples]
        for name in MODEL_DEPLOYMENTS:
            axis.step(times, [running.get(name, 0) for _, running in samples], where="post", label=name,
                      color=colours[name])
        axis.set_ylabel("running replicas")
        axis.set_title(title)
        axis.grid(alpha=0.3)

    replicas(axes[0][0], ramp_run["samples"], "Ramp 0 → 16 → 0 clients: replicas")
    clients_axis = axes[0][0].twinx()
    times = [moment for moment, _ in ramp_run["clients"]] + [ramp_run["samples"][-1][0]]
    counts = [count for _, count in ramp_run["clients"]] + [0]
    clients_axis.step(times, counts, where="post", color="grey", linestyle="--", label="clients")
    clients_axis.set_ylabel("clients")
    lines = axes[0][0].get_legend_handles_labels()
    extra = clients_axis.get_legend_handles_labels()
    axes[0][0].legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper right")

    windows = latency_windows(ramp_run["records"], ramp_run["samples"][-1][0])
    axes[1][0].plot([w[0] for w in windows], [w[1] for w in windows], marker="o", label="p50")
    axes[1][0].plot([w[0] for w in windows], [w[2] for w in windows], marker="o", label="p99")
    axes[1][0].set_ylabel(f"latency (s), per {WINDOW_S:.0f} s window")
    axes[1][0].set_xlabel("time (s)")
    axes[1][0].legend()
    axes[1][0].grid(alpha=0.3)

    replicas(axes[0][1], loss["samples"], "Node loss: replicas")
    for axis in axes[:, 1]:
        axis.axvline(loss["removed_at"], color="black", linestyle=":", label="worker removed")
    axes[0][1].legend(loc="upper right")
    end = loss["samples"][-1][0]
    windows = latency_windows(loss["records"], end)
    axes[1][1].plot([w[0] for w in windows], [w[1] for w in windows], marker="o", label="p50 (200s)")
    axes[1][1].plot([w[0] for w in windows], [w[2] for w in windows], marker="o", label="p99 (200s)")
    failed = [r["ended"] for r in loss["records"] if r["status"] == 503]
    if failed:
        axes[1][1].scatter(failed, [0] * len(failed), marker="x", color="tab:red", label="503 + Retry-After", zorder=3)
    axes[1][1].set_xlabel("time (s)")
    axes[1][1].set_ylabel("latency (s)")
    axes[1][1].legend()
    axes[1][1].grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def fmt(value: float | None, unit: str = " s") -> str:
    return "—" if value is None else f"{value:.1f}{unit}"


def dated(results: dict[str, Any]) -> str:
    """Which part ran when, if the parts were run on different days (``--runs``)."""
    days = results.get("runs_dated", {})
    if len(set(days.values())) <= 1:
        return ""
    return " per part (" + ", ".join(f"{name.replace('_', ' ')} {day}" for name, day in days.items()) + ")"


def counts(records: list[dict[str, Any]]) -> str:
    return ", ".join(f"{status}: {count}" for status, count in sorted(Counter(r["status"] for r in records).items()))


def summary(records: list[dict[str, Any]]) -> str:
    ok = [r["ended"] - r["started"] for r in records if r["status"] == 200]
    statuses = Counter(r["status"] for r in records)
    text = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
    if ok:
        text += f"; 200s p50 {percentile(ok, 0.5):.2f} s, p99 {percentile(ok, 0.99):.2f} s"
    return text


def render(results: dict[str, Any], out: Path, figure: Path) -> None:
    ramp_run, sam, loss = results["ramp"], results["sam_heavy"], results["node_loss"]
    loss_statuses = Counter(r["status"] for r in loss["records"])
    after = [r for r in loss["records"] if r["ended"] >= loss["removed_at"]]
    after_statuses = Counter(r["status"] for r in after)
    spanning = [r for r in loss["records"] if r["started"] < loss["removed_at"] < r["ended"]]
    retry = loss["retrying_records"]
    hold = [r["ended"] - r["started"] for r in ramp_run["records"]
            if r["status"] == 200 and 20.0 <= r["ended"] <= ramp_run["load_ends"]]
    lines = [
        "# Scaling on a multi-node cluster (simulated GPUs)",
        "",
        f"Written by `benchmarks/scaling.py` on {results['date']} ({results['machine']}); figures from "
        f"one run{dated(results)}. Re-render from `benchmarks/scaling.json` with `--render-from`.",
        "",
        "**Set-up.** `ray.cluster_utils.Cluster` on one 2-core machine: a head (4 logical CPUs, the "
        "Serve controller, the proxy and the ingress) and two workers with 8 logical CPUs and one "
        "logical GPU each. The application is `configs/gpu.yaml` — the same deployments, GPU "
        "fractions (detector 0.1, SAM 0.2, inpainter 0.7), autoscaling blocks and limits — through "
        "`configs/overlays/simulated-cpu.yaml` (sim:// models with published A100 costs and a free "
        "VAE — diffusers' published VAE figures would add 46 ms per 512² crop, "
        "[docs/simulated.md](simulated.md)) and `--set` values that shorten Serve's autoscaling "
        f"timing to {json.dumps(FAST_AUTOSCALING)} (production: 10–15 s up, 300–600 s down, 30 s "
        "look-back). Replicas are placed best-fit (`RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1`). "
        "Clients are closed-loop HTTP clients in the driver; each ramp request refines one "
        "512×512 crop for 20 steps (≈ 0.9 s of modelled A100 time alone, less when batched).",
        "",
        f"![replicas and latency over time]({figure.name})",
        "",
        "## Ramp: 0 → 16 clients (20 s) → hold (40 s) → 0 (20 s)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| inpainter ≥ 2 replicas, from the first client | {fmt(ramp_run['scale_up_s'])} |",
        f"| inpainter back to 1, from the last request's end | {fmt(ramp_run['scale_down_s'])} |",
        f"| peak running replicas | {', '.join(f'{k} {v}' for k, v in ramp_run['peak'].items())} |",
        f"| requests | {summary(ramp_run['records'])} |",
        f"| latency while holding 16 clients | p50 {percentile(hold, 0.5):.2f} s, p99 "
        f"{percentile(hold, 0.99):.2f} s |" if hold else "| latency while holding | — |",
        "",
        "Serve asks for up to `max_replicas: 8` inpainters (16 clients / `target_ongoing_requests: 4`), "
        "but each 0.7-GPU replica needs a GPU of its own: two run, the rest wait for a GPU "
        "(`PENDING_ALLOCATION`) — on KubeRay the in-tree autoscaler would add GPU nodes for them. "
        "SAM and the detector are not used by these requests and stay at one replica.",
        "",
        "## SAM-heavy load: 16 clients, SAM on every request, 1-step 128×128 crops",
        "",
        "| measure | value |",
        "|---|---|",
        f"| SAM ≥ 2 replicas, from the first client | {fmt(sam['scale_up_s'])} |",
        f"| SAM back to 1, from the last request's end | {fmt(sam['scale_down_s'])} |",
        f"| peak running replicas under load | {', '.join(f'{k} {v}' for k, v in sam['peak'].items())} |",
        f"| requests | {summary(sam['records'])} |",
        "",
        "Each deployment scales on its own load: SAM grows (up to 4 × 0.2 GPU fits on the second GPU "
        "next to nothing else), the inpainter stays at `min_replicas`.",
        "",
        "## Node loss: the packed worker removed under load",
        "",
        "6 closed-loop clients and 2 clients that retry on 503/429 after `Retry-After`; after 15 s "
        "`cluster.remove_node` kills the worker whose GPU carries detector + SAM + inpainter."
        + (f" Load average (1, 5, 15 min) before / after the run: {loss['load_average']['before']} / "
           f"{loss['load_average']['after']}." if "load_average" in loss else ""),
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests (all clients without retry) | {summary(loss['records'])} |",
        f"| of which ended after the removal | {', '.join(f'{k}: {v}' for k, v in sorted(after_statuses.items()))} |",
        f"| in flight when the node went: answers, slowest | {counts(spanning)}; "
        f"{fmt(max((r['ended'] - r['started'] for r in spanning), default=None))} |",
        f"| 500s / hangs (no answer within 120 s) | {loss_statuses.get(500, 0)} / {loss_statuses.get(0, 0)} |",
        f"| 503s with `Retry-After` | {sum(1 for r in loss['records'] if r['status'] == 503 and r['retry_after'])} "
        f"of {loss_statuses.get(503, 0)} |",
        f"| every model deployment running again, after the removal | {fmt(loss['recovered_s'])} |",
        f"| `/healthz` not 200 from / 200 again from, after the removal | {fmt(loss['unhealthy_from_s'])} / "
        f"{fmt(loss['healthy_s'])} |",
        f"| retrying clients: requests completed, attempts | "
        f"{sum(1 for r in retry if r['status'] == 200)} of {len(retry)}, {sum(r['attempts'] for r in retry)} |",
        f"| replicas after recovery all on the surviving worker | "
        f"{all(p['node_id'] == loss['survivor'] for ps in loss['placements_after'].values() for p in ps)} |",
        *([f"| before model calls were retried ({before['date']}) | {before['requests']}; "
           f"{before['failed_after_removal']} |"] if (before := results.get("node_loss_before")) else []),
        "",
        "A model call whose replica died with the node is sent again by the ingress "
        "(`serve_app/model_calls.py`): Serve's router holds it until the controller has started a "
        "replica on the surviving GPU, where detector 0.1 + SAM 0.2 + inpainter 0.7 fit, and the "
        "work — deterministic, same seed — is redone there; the request is answered 200 later, "
        "within its deadline (`limits.request_timeout_s`). Only where no replica can be placed "
        "before the deadline is a request answered 503 with `Retry-After` (tests/cluster: every "
        "GPU node removed). The ingress itself runs on the head "
        "(`--set ingress.ray_actor_options.resources={cpu_group: 0.01}`), since a proxy whose "
        "ingress replica dies mid-request answers 500.",
        "",
    ]
    out.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "scaling.md")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "scaling.json")
    parser.add_argument("--render-from", type=Path)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                        help="the parts to run; the others keep their figures from --json")  # fmt: skip
    args = parser.parse_args()
    figure = args.out.with_suffix(".png")
    if args.render_from:
        results = json.loads(args.render_from.read_text())
    else:
        from deployments.runtime_env import apply_offline_env

        apply_offline_env()
        started = time.monotonic()
        kept = json.loads(args.json.read_text()) if set(args.runs) != set(RUNS) else {}
        results: dict[str, Any] = {
            **kept,
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "runs_dated": {**kept.get("runs_dated", {name: kept.get("date") for name in RUNS if name in kept}),
                           **{name: time.strftime("%Y-%m-%d") for name in args.runs}},  # fmt: skip
        }
        with simulated_cluster() as cluster:
            results["startup_s"] = time.monotonic() - started
            print(f"cluster up in {results['startup_s']:.0f} s", flush=True)
            for name in args.runs:
                results[name] = RUNS[name](cluster)
                print(f"{name}:", summary(results[name]["records"]), flush=True)
        results["total_s"] = time.monotonic() - started
        args.json.write_text(json.dumps(results, indent=1))
    plot(results, figure)
    render(results, args.out, figure)
    print(f"wrote {args.out} and {figure}")
    for name in ("ramp", "sam_heavy"):
        print(name, {key: results[name][key] for key in ("scale_up_s", "scale_down_s", "peak")})
    print("node loss", {key: results["node_loss"][key] for key in ("recovered_s", "healthy_s")})


if __name__ == "__main__":
    main()
