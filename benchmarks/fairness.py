"""Fair sharing between API keys, measured: one key floods the inpainter, another sends single requests.

``configs/gpu.yaml``'s graph on the ``sim://`` accelerator (``configs/overlays/simulated-cpu.yaml``:
published A100 costs, modelled time slept) on a private one-node Ray instance that declares one
logical GPU, with API keys on (a key file made here) and one replica per deployment (the
autoscalers capped: fairness is about one engine's queue). Two keys:

- **A** floods: ``--flood-clients`` (6) closed-loop clients, each image with ``--flood-faces`` (8)
  faces, 20 steps, 512×512 crops, crop factor 1: the faces' crops do not overlap, so each image's
  8 crops reach the inpainter together in one wave (with FaceDetailer's default crop factor 3 they
  overlap and go one wave after another: A then has only about one crop per client in the engine,
  no more than one batch, and there is no queue to share);
- **B** sends one single-face request of the same kind at a time (then waits ``--pause-s``).

Phases, each on a fresh deployment of the config (``serve.run`` of the changed config):

1. ``alone``: B without A (the baseline);
2. ``fair``: A's flood and B, the engine's weighted fair queue between keys (``auth.fair_queueing``);
3. ``fifo``: the same with ``auth.fair_queueing: false`` — one first-come queue, the old behaviour;

each with gpu.yaml's inpainter ``max_ongoing_requests`` (8) and with ``--wide-ongoing`` (64):
Serve holds calls beyond a replica's ``max_ongoing_requests`` in the caller's router queue, first
come first served, before the engine's fair queue sees them.

Per phase: B's latency (p50, p90, max) and its inpainter queue wait (the JSON ``timings``), A's
refined faces per second. Writes ``benchmarks/fairness.json`` and the "Fair sharing, measured"
section of ``docs/auth.md``. Run it under the heavy-command lock on an otherwise idle machine
(about 10 minutes):

    flock /tmp/fd-heavy.lock .venv/bin/python benchmarks/fairness.py
    .venv/bin/python benchmarks/fairness.py --render-from benchmarks/fairness.json   # re-render only
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GPU_CONFIG = REPO / "configs" / "gpu.yaml"
SIMULATED_OVERLAY = REPO / "configs" / "overlays" / "simulated-cpu.yaml"
DOC = REPO / "docs" / "auth.md"
RESULTS = REPO / "benchmarks" / "fairness.json"
SECTION_START = "<!-- fairness:start -->"
SECTION_END = "<!-- fairness:end -->"
PARAMS = {"steps": 20, "guide_size": 512, "max_size": 512, "seed": 1, "bbox_crop_factor": 1.0}
IMAGE_SIZE = 768  # 3×3 grid cells of 256 px: every face's crop is sampled at 512×512


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def image(faces: int, seed: int) -> bytes:
    """Texture inside ``faces`` cells of the simulated detector's 3×3 grid, flat grey elsewhere.

    The texture keeps a flat margin in its cell: the detector measures contrast on a subsampled
    image, and a cell whose rounded bounds took in a sliver of its neighbour's texture would count
    as a face too.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 120, np.uint8)
    cell, margin = IMAGE_SIZE // 3, 16
    for index in range(faces):
        row, column = divmod(index, 3)
        top, left = row * cell + margin, column * cell + margin
        array[top : top + cell - 2 * margin, left : left + cell - 2 * margin] = rng.integers(
            0, 256, (cell - 2 * margin, cell - 2 * margin, 3), dtype=np.uint8
        )
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for_idle(limit_s: float, threshold: float = 1.0) -> float:
    """Wait (at most ``limit_s``) until the 1-minute load average is below ``threshold``; seconds waited."""
    started = time.monotonic()
    while loadavg()[0] >= threshold and time.monotonic() - started < limit_s:
        time.sleep(5)
    return round(time.monotonic() - started, 1)


def other_pytest() -> bool:
    """Whether another pytest session is running on the machine (its load lands in the figures)."""
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != own:
            try:
                if b"pytest" in (entry / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------------------- serving


def config_sets(port: int, keys_file: Path, fair: bool, ongoing: int) -> list[str]:
    sets = [
        f"serve.http_options.port={port}",
        f"auth={{keys_file: {keys_file}, fair_queueing: {str(fair).lower()}}}",
        f"inpainter.deployment.max_ongoing_requests={ongoing}",
        "detector.model=sim://detector?faces=8",
    ]
    for part in ("detector.deployment", "sam.deployment", "inpainter.deployment", "ingress"):
        sets += [f"{part}.autoscaling_config.min_replicas=1", f"{part}.autoscaling_config.max_replicas=1"]
    return sets


def deploy(port: int, keys_file: Path, fair: bool, ongoing: int) -> None:
    from serve_app.cli import start_serving

    start_serving(GPU_CONFIG, overlays=[SIMULATED_OVERLAY], sets=config_sets(port, keys_file, fair, ongoing))
    wait_healthy(f"http://127.0.0.1:{port}")


def wait_healthy(url: str, deadline_s: float = 300.0) -> None:
    import httpx

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/healthz", timeout=10, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url}/healthz not 200 within {deadline_s:.0f} s")


# ---------------------------------------------------------------------------------------- load


async def run_phase(url: str, keys: dict[str, str], args: argparse.Namespace, flood: bool) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    records: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    stop = asyncio.Event()
    epoch = time.monotonic()

    async def send(http: Any, key: str, body: bytes, json_format: bool) -> dict[str, Any]:
        started = time.monotonic() - epoch
        response = await http.post(
            "/v1/detail" + ("?format=json" if json_format else ""),
            files={"image": ("image.png", body, "image/png")},
            data={"params": json.dumps(PARAMS)},
            headers={"Authorization": f"Bearer {keys[key]}"},
        )
        record: dict[str, Any] = {"started": started, "ended": time.monotonic() - epoch,
                                  "status": response.status_code}  # fmt: skip
        if response.status_code == 200 and json_format:
            body_json = response.json()
            record["faces"] = body_json["faces_refined"]
            record["queue_wait_s"] = body_json["timings"].get("inpaint_queue_wait")
            record["timings"] = body_json["timings"]
        elif response.status_code == 200:
            record["faces"] = int(response.headers.get("x-faces-refined", 0))
        else:
            record["error"] = response.text[:300]
        return record

    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits, trust_env=False) as http:

        async def flooder(client: int) -> None:
            body = image(args.flood_faces, client)
            while not stop.is_set():
                records["A"].append(await send(http, "A", body, json_format=False))

        tasks = [asyncio.create_task(flooder(client)) for client in range(args.flood_clients)] if flood else []
        if flood:
            await asyncio.sleep(args.warmup_s)  # the queue fills up
        single = image(1, 99)
        for _ in range(args.requests):
            records["B"].append(await send(http, "B", single, json_format=True))
            await asyncio.sleep(args.pause_s)
        b_window = (records["B"][0]["started"], records["B"][-1]["ended"])
        stop.set()
        await asyncio.gather(*tasks)
    return summarize(records, b_window, flood)


def summarize(records: dict[str, list[dict[str, Any]]], window: tuple[float, float], flood: bool) -> dict[str, Any]:
    b_ok = [r for r in records["B"] if r["status"] == 200]
    latencies = [r["ended"] - r["started"] for r in b_ok]
    waits = [r["queue_wait_s"] for r in b_ok if r.get("queue_wait_s") is not None]
    start, end = window
    a_in_window = [r for r in records["A"] if r["status"] == 200 and start <= r["ended"] <= end]
    a_statuses: dict[str, int] = {}
    for record in records["A"]:
        a_statuses[str(record["status"])] = a_statuses.get(str(record["status"]), 0) + 1
    return {
        "flood": flood,
        "b_requests": len(records["B"]),
        "b_ok": len(b_ok),
        "b_latency_s": {"p50": percentile(latencies, 0.5), "p90": percentile(latencies, 0.9),
                        "max": max(latencies, default=None),
                        "mean": statistics.fmean(latencies) if latencies else None},
        "b_queue_wait_s": {"p50": percentile(waits, 0.5), "max": max(waits, default=None)},
        "a_faces_per_s": sum(r["faces"] for r in a_in_window) / (end - start) if flood and end > start else None,
        "a_latency_s_p50": percentile([r["ended"] - r["started"] for r in a_in_window], 0.5),
        "a_statuses": a_statuses,
        "records": records,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------- main


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from benchmarks.run_benchmarks import free_port
    from deployments.runtime_env import apply_offline_env
    from serve_app.auth.keys import key_entry, new_key

    apply_offline_env()
    idle_wait = wait_for_idle(args.wait_idle_s)
    keys = {"A": new_key(), "B": new_key()}
    workdir = Path(tempfile.mkdtemp(prefix="fairness-"))
    keys_file = workdir / "keys.yaml"
    import yaml

    keys_file.write_text(yaml.safe_dump({"keys": [key_entry("flood-a", keys["A"], ["detail"]),
                                                   key_entry("single-b", keys["B"], ["detail"])]}))  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "loadavg_start": loadavg(),
                    "idle_wait_s": idle_wait, "other_pytest_seen": other_pytest()},
        "params": PARAMS,
        "flood": {"clients": args.flood_clients, "faces": args.flood_faces},
        "phases": {},
    }  # fmt: skip
    ray.init(address="local", num_cpus=16, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        plan: list[tuple[str, bool, bool, int]] = [("alone", False, True, 8)]
        for ongoing in (8, args.wide_ongoing):
            plan += [(f"fair/{ongoing}", True, True, ongoing), (f"fifo/{ongoing}", True, False, ongoing)]
        plan = [step for step in plan if not args.phases or step[0] in args.phases]
        for name, flood, fair, ongoing in plan:
            print(f"phase {name}: deploying (fair_queueing={fair}, inpainter max_ongoing_requests={ongoing})…",
                  flush=True)  # fmt: skip
            deploy(port, keys_file, fair, ongoing)
            asyncio.run(warm_up(url, keys))
            started = time.monotonic()
            phase = asyncio.run(run_phase(url, keys, args, flood))
            phase.update(fair_queueing=fair, max_ongoing_requests=ongoing, seconds=time.monotonic() - started)
            results["phases"][name] = phase
            print(f"  B p50 {fmt(phase['b_latency_s']['p50'])} max {fmt(phase['b_latency_s']['max'])}, "
                  f"A {fmt(phase['a_faces_per_s'], ' faces/s')}, A statuses {phase['a_statuses']}", flush=True)
            if phase["records"]["B"]:
                timings = phase["records"]["B"][-1].get("timings", {})
                print("  B's last timings: " + ", ".join(f"{k} {v:.3f}" for k, v in timings.items()), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    results["machine"]["loadavg_end"] = loadavg()
    results["machine"]["other_pytest_seen_end"] = other_pytest()
    return results


async def warm_up(url: str, keys: dict[str, str]) -> None:
    """One request per key after each deployment: the first sampling call sets things up."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=300, trust_env=False) as http:
        for key in ("A", "B"):
            answer = await http.post("/v1/detail", files={"image": ("i.png", image(1, 0), "image/png")},
                                     data={"params": json.dumps(PARAMS)},
                                     headers={"Authorization": f"Bearer {keys[key]}"})  # fmt: skip
            if answer.status_code != 200:
                raise RuntimeError(f"warm-up answered {answer.status_code}: {answer.text[:300]}")


def fmt(value: float | None, unit: str = " s") -> str:
    return "–" if value is None else f"{value:.2f}{unit}"


def render(results: dict[str, Any]) -> str:
    phases = results["phases"]
    alone = phases["alone"]["b_latency_s"]["p50"]
    lines = [
        SECTION_START,
        "",
        f"Measured by `benchmarks/fairness.py` (commit {results['commit']}; raw numbers in "
        "`benchmarks/fairness.json`): `configs/gpu.yaml`'s graph on the `sim://` accelerator (published A100 "
        "costs, the inpainter's UNet at "
        "`a + b·n` with n = 2 per crop under CFG), one replica per deployment, engine `max_batch_size` 8 and "
        "`max_queued_crops` 64. Key **A** floods with "
        f"{results['flood']['clients']} closed-loop clients of {results['flood']['faces']} faces each; key **B** "
        "sends one single-face request at a time. Every request: 20 steps, 512×512 crops, crop factor "
        f"{results.get('params', {}).get('bbox_crop_factor', 3.0):g}. "
        f"Machine: {results['machine']['nproc']} cores, load average {results['machine']['loadavg_start'][0]:.1f} at "
        f"the start and {results['machine']['loadavg_end'][0]:.1f} at the end; another pytest session running: "
        f"{'yes' if results['machine']['other_pytest_seen'] or results['machine']['other_pytest_seen_end'] else 'no'} "
        "(the simulated device sleeps; the host work around it shares the cores).",
        "",
        "| phase | queue between keys | inpainter `max_ongoing_requests` | B latency p50 | p90 | max | "
        "B × alone (p50) | B's inpainter queue wait p50 | A refined faces/s | A answers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, phase in phases.items():
        latency = phase["b_latency_s"]
        ratio = latency["p50"] / alone if latency["p50"] and alone else None
        queue = "–" if not phase["flood"] else ("fair (by key)" if phase["fair_queueing"] else "FIFO (one queue)")
        statuses = ", ".join(f"{count}× {status}" for status, count in sorted(phase["a_statuses"].items())) or "–"
        lines.append(
            f"| {name.split('/')[0]} | {queue} | {phase['max_ongoing_requests']} | {fmt(latency['p50'])} | "
            f"{fmt(latency['p90'])} | {fmt(latency['max'])} | {'–' if ratio is None else f'{ratio:.1f}×'} | "
            f"{fmt(phase['b_queue_wait_s']['p50'])} | {fmt(phase['a_faces_per_s'], '')} | {statuses} |"
        )
    lines += ["", SECTION_END]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(SECTION_START), text.index(SECTION_END) + len(SECTION_END)
    DOC.write_text(text[:start] + section + text[end:], encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood-clients", type=int, default=6, help="6 × 8 crops stay under max_queued_crops (64)")
    parser.add_argument("--flood-faces", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8, help="B's requests per phase")
    parser.add_argument("--pause-s", type=float, default=0.7, help="B's pause between requests")
    parser.add_argument("--warmup-s", type=float, default=8.0, help="A's flood before B's first request")
    parser.add_argument("--wide-ongoing", type=int, default=64, help="the raised inpainter max_ongoing_requests")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--wait-idle-s", type=float, default=180.0, help="wait this long at most for a quiet machine")
    parser.add_argument("--phases", nargs="*", help="only these phases (alone, fair/8, fifo/8, fair/64, fifo/64)")
    parser.add_argument("--render-from", type=Path, help="re-render docs/auth.md from saved results")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.render_from is not None:
        results = json.loads(args.render_from.read_text())
    else:
        results = measure(args)
        args.json.write_text(json.dumps(results, indent=1))
    write_doc(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
