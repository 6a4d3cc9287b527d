#!/usr/bin/env python
"""Bulk jobs vs the HTTP service: images/s, faces/s and UNet batch sizes; scaling over simulated GPU nodes.

Two set-ups, each measured both ways on the same images:

1. **Local CPU** (``configs/local-cpu.yaml``: faceghost's face YOLO, the tiny random-weight SD
   inpainter) on a private 2-CPU Ray instance: ``run_batch`` over a folder of images with 1 and 2
   refine actors, the same job again (resume: everything skipped), then the served application
   with 1, 4 and 8 concurrent HTTP clients sending the same images.
2. **Simulated GPUs** (``configs/gpu.yaml`` through ``configs/overlays/simulated-cpu.yaml``:
   ``sim://`` models with published A100 costs) on a ``ray.cluster_utils.Cluster`` with 1, 2 and 4
   worker nodes of one logical GPU each (tests/cluster/harness.py): the batch job, then the
   service (inpainter replicas = GPU nodes) with 8 clients per GPU node.

3. **Resume overhead** without Ray: a job of 10,000 inputs all in the manifest, run again
   (listing, manifest and journal read, output check, compaction).

Images/s and faces/s are given end to end (the job's wall time, its start-up included) and
steady (from the first to the last image written: what a long job sustains); the service's
start-up is not counted. UNet batch sizes are the inpainter engines' counters (the job's
actors report them; the service's ``GET /v1/stats``). Writes ``benchmarks/batch.json`` and
the figures section of ``docs/batch.md``. Run under the heavy lock on a quiet machine
(about 12 minutes):

    flock /tmp/fd-heavy.lock .venv/bin/python benchmarks/batch.py
    .venv/bin/python benchmarks/batch.py --render-from benchmarks/batch.json   # re-render only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.run_benchmarks import (  # noqa: E402
    CpuMeter,
    ForeignLoadMonitor,
    free_port,
    log,
    machine_info,
    png_bytes,
    tiled_faces,
    wait_for_idle,
)

LOCAL_CONFIG = REPO / "configs" / "local-cpu.yaml"
DOC = REPO / "docs" / "batch.md"
RESULTS = REPO / "benchmarks" / "batch.json"
START, END = "<!-- figures:start (benchmarks/batch.py) -->", "<!-- figures:end -->"
# the benchmark README's FaceDetailer values (guide 256 / max 512), 8 steps instead of 20
LOCAL_PARAMS = {"steps": 8, "guide_size": 256, "max_size": 512, "seed": 3}
LOCAL_FACES = (1, 2, 4)  # faces per image, cycled over the images
LOCAL_CLIENTS = (1, 4, 8)
LOCAL_ACTORS = (1, 2)  # refine actors (inpainter.deployment.num_replicas) of the local batch job
RESUME_INPUTS = 10_000
# tests/cluster's inpainter-heavy request: one 512×512 crop, 20 steps
SIM_PARAMS = {"steps": 20, "guide_size": 512, "max_size": 512, "seed": 1}
SIM_NODES = (1, 2, 4)
SIM_IMAGES_PER_NODE = 40
SIM_CLIENTS_PER_NODE = 8


# ------------------------------------------------------------------------------------------ shared


def steady_rate(rows: list[dict[str, Any]]) -> float | None:
    """Images/s between the first and the last image written (None below 2 images)."""
    times = sorted(row["finished_at"].timestamp() for row in rows if row["status"] == "ok")
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def batch_run(inputs: Path, output: Path, **options: Any) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from serve_app.batch import run_batch

    with CpuMeter() as meter:
        summary = run_batch(str(inputs), str(output), resume=False, progress=False, **options)
    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    steady = steady_rate(rows)
    faces = sum(row["faces_refined"] or 0 for row in rows)
    assert summary.succeeded == len(rows) and summary.failed == 0, summary.lines()
    return {
        "images": summary.succeeded,
        "faces": faces,
        "wall_s": round(summary.seconds, 2),
        "images_per_s": round(summary.succeeded / summary.seconds, 3),
        "faces_per_s": round(faces / summary.seconds, 3),
        "steady_images_per_s": round(steady, 3) if steady else None,
        "steady_faces_per_s": round(steady * faces / len(rows), 3) if steady else None,
        "unet_batch_sizes": summary.engine.get("unet_batch_sizes", {}),
        "mean_unet_batch": mean_batch(summary.engine.get("unet_batch_sizes", {})),
        "busy_cores": round(meter.cores, 2),
    }


def mean_batch(sizes: dict[Any, int]) -> float | None:
    calls = sum(sizes.values())
    return round(sum(int(size) * count for size, count in sizes.items()) / calls, 2) if calls else None


def delta(after: dict[Any, int], before: dict[Any, int]) -> dict[int, int]:
    found = {int(size): count - int(before.get(size, before.get(str(size), 0))) for size, count in after.items()}
    return {size: count for size, count in sorted(found.items()) if count}


def http_run(url: str, images: list[bytes], params: dict[str, Any], clients: int) -> dict[str, Any]:
    """``clients`` closed-loop HTTP clients sharing the images (each sent once); PNG answers."""
    import httpx

    stats_before = httpx.get(f"{url}/v1/stats", timeout=60, trust_env=False).json()["inpainter"]
    work: queue.Queue[bytes] = queue.Queue()
    for image in images:
        work.put(image)
    faces: list[int] = []
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
            while True:
                try:
                    image = work.get_nowait()
                except queue.Empty:
                    return
                response = http.post(
                    "/v1/detail", files={"image": ("image.png", image, "image/png")},
                    data={"params": json.dumps(params)},
                )  # fmt: skip
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                else:
                    faces.append(int(response.headers["X-Faces-Refined"]))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    with CpuMeter() as meter:
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=1800)
        wall = time.perf_counter() - started
    assert not errors, errors[:3]
    stats_after = httpx.get(f"{url}/v1/stats", timeout=60, trust_env=False).json()["inpainter"]
    sizes = delta(stats_after["unet_batch_sizes"], stats_before["unet_batch_sizes"])
    return {
        "clients": clients,
        "images": len(faces),
        "faces": sum(faces),
        "wall_s": round(wall, 2),
        "images_per_s": round(len(faces) / wall, 3),
        "faces_per_s": round(sum(faces) / wall, 3),
        "unet_batch_sizes": sizes,
        "mean_unet_batch": mean_batch(sizes),
        "busy_cores": round(meter.cores, 2),
    }


# ------------------------------------------------------------------------------------------ local CPU


def local_cpu(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import ray
    from ray import serve

    from serve_app.batch.job import load_app_config
    from serve_app.cli import start_serving

    inputs = workdir / "local-in"
    inputs.mkdir()
    images = []
    for index in range(opts.local_images):
        data = png_bytes(tiled_faces(LOCAL_FACES[index % len(LOCAL_FACES)]))
        (inputs / f"tiles-{index:02d}.png").write_bytes(data)
        images.append(data)
    _, env_vars = load_app_config(LOCAL_CONFIG)
    result: dict[str, Any] = {"params": LOCAL_PARAMS, "images": len(images)}
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env_vars},
             log_to_driver=False)  # fmt: skip
    try:
        result["batch_actors"] = []
        for actors in opts.local_actors:
            log(f"local CPU: batch job, {actors} refine actor(s)")
            run = batch_run(
                inputs, workdir / f"local-out-{actors}", config=LOCAL_CONFIG, params=LOCAL_PARAMS,
                sets=[f"inpainter.deployment.num_replicas={actors}"],
            )  # fmt: skip
            result["batch_actors"].append({"actors": actors, **run})
            log(f"  {run}")
        result["batch"] = result["batch_actors"][0]
        log("local CPU: the same job again (resume: every input skipped)")
        result["resume_rerun"] = resume_run(inputs, workdir / f"local-out-{opts.local_actors[0]}")
        log(f"  {result['resume_rerun']}")
    finally:
        ray.shutdown()
    port = free_port()
    started = time.perf_counter()
    start_serving(LOCAL_CONFIG, port=port, join_cluster=False)
    url = f"http://127.0.0.1:{port}"
    try:
        http_run(url, images[:2], LOCAL_PARAMS, 1)  # warm-up: first calls, first prompt encodings
        result["service_startup_s"] = round(time.perf_counter() - started, 1)
        result["service"] = []
        for clients in LOCAL_CLIENTS:
            log(f"local CPU: service, {clients} clients")
            result["service"].append(http_run(url, images, LOCAL_PARAMS, clients))
            log(f"  {result['service'][-1]}")
    finally:
        serve.shutdown()
        ray.shutdown()
    return result


def resume_run(inputs: Path, output: Path, config: Path = LOCAL_CONFIG) -> dict[str, Any]:
    """The job run again on its complete OUTPUT: what resuming costs before any image is detailed."""
    from serve_app.batch import run_batch

    started = time.perf_counter()
    summary = run_batch(str(inputs), str(output), config=config, params=LOCAL_PARAMS, progress=False,
                        log=lambda _: None)  # fmt: skip
    wall = time.perf_counter() - started
    assert summary.skipped == summary.inputs and summary.succeeded == 0, summary.lines()
    return {"inputs": summary.inputs, "skipped": summary.skipped, "wall_s": round(wall, 3)}


def resume_overhead(workdir: Path, count: int) -> dict[str, Any]:
    """A job of ``count`` inputs, all recorded (half in the manifest, half in the journal), run again."""
    import datetime as dt

    from serve_app.batch.job import _start_job, plan_job
    from serve_app.batch.manifest import Manifest
    from serve_app.batch.storage import resolve

    inputs, output = workdir / "resume-in", workdir / "resume-out"
    for folder in (inputs, output):
        folder.mkdir()
    for index in range(count):
        (inputs / f"{index:05d}.png").write_bytes(b"x")
        (output / f"{index:05d}.png").write_bytes(b"x")
    location = resolve(str(output))
    manifest = Manifest(location)
    plan = plan_job(LOCAL_CONFIG, (), (), LOCAL_PARAMS, None, None, None, "image")
    _start_job(location, manifest, plan.fingerprint, True, str(inputs))
    stamp = dt.datetime.now(dt.UTC)
    rows = [
        {"input": str(inputs / f"{index:05d}.png"), "key": f"{index:05d}", "status": "ok",
         "outputs": [f"{index:05d}.png"], "run_id": "bench", "finished_at": stamp}
        for index in range(count)
    ]  # fmt: skip
    half = count // 2
    for start in range(0, half, 4):  # one journal file per batch of 4, as the write stage makes them
        manifest.append(rows[start : start + 4], "bench")
    manifest.compact()
    for start in range(half, count, 4):  # the other half still in the journal (a run killed before compaction)
        manifest.append(rows[start : start + 4], "bench")
    journal_files = len(manifest.journal_files())
    run = resume_run(inputs, output)
    return {**run, "journal_files": journal_files}


# ------------------------------------------------------------------------------------------ simulated GPUs


def simulated(opts: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    from ray import serve

    from serve_app.cli import start_serving
    from tests.cluster.harness import CLUSTER_ENV, GPU_CONFIG, SIMULATED_OVERLAY, cluster_sets, gpu_nodes, sample_image

    runs = []
    saved = dict(os.environ)
    os.environ.update(CLUSTER_ENV)  # Serve packs replicas best-fit, as in tests/cluster
    try:
        for nodes in opts.nodes:
            count = opts.sim_images_per_node * nodes
            inputs = workdir / f"sim-in-{nodes}"
            inputs.mkdir()
            images = []
            for index in range(count):
                images.append(sample_image(index))
                (inputs / f"sample-{index:03d}.png").write_bytes(images[-1])
            run: dict[str, Any] = {"gpu_nodes": nodes, "images": count}
            with gpu_nodes(nodes):
                log(f"simulated, {nodes} GPU node(s): batch job")
                run["batch"] = batch_run(
                    inputs, workdir / f"sim-out-{nodes}", config=GPU_CONFIG, overlays=[SIMULATED_OVERLAY],
                    params=SIM_PARAMS,
                )  # fmt: skip
                log(f"  {run['batch']}")
                port = free_port()
                sets = cluster_sets(port) + [
                    "inpainter.deployment.autoscaling_config=null",
                    f"inpainter.deployment.num_replicas={nodes}",
                ]
                started = time.perf_counter()
                start_serving(GPU_CONFIG, overlays=[SIMULATED_OVERLAY], sets=sets)
                url = f"http://127.0.0.1:{port}"
                try:
                    http_run(url, images[:4], SIM_PARAMS, 4)  # warm-up
                    run["service_startup_s"] = round(time.perf_counter() - started, 1)
                    clients = SIM_CLIENTS_PER_NODE * nodes
                    log(f"simulated, {nodes} GPU node(s): service, {clients} clients")
                    run["service"] = http_run(url, images, SIM_PARAMS, clients)
                    log(f"  {run['service']}")
                finally:
                    serve.shutdown()
            runs.append(run)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return runs


# ------------------------------------------------------------------------------------------ write-up


def render(results: dict[str, Any]) -> str:
    machine, local, sims = results["machine"], results.get("local"), results.get("simulated", [])
    lines = [
        START,
        "",
        f"Measured by `benchmarks/batch.py` on {results['date']} ({machine['cpu_model'] or 'x86_64'}, "
        f"{machine['nproc']} CPUs, {machine['ram_gib']} GiB, no GPU; Python {machine['python']}, Ray "
        f"{machine['ray']}, torch {machine['torch']}; commit {machine['git_commit']}); raw numbers in "
        "`benchmarks/batch.json`. Conditions: load average "
        f"{' / '.join(str(v) for v in results['conditions']['loadavg_before'])} before, "
        f"{results['conditions']['busy_cores_at_start']} busy cores when it started, another pytest session "
        f"seen in {results['conditions']['foreign']['with_pytest_running']} of "
        f"{results['conditions']['foreign']['samples']} 2-s samples. *Steady* = from the first to the last "
        "image written (what a long job sustains); *end to end* includes the job's start-up (Ray Data, "
        "actors, model loading). The service's start-up is not counted.",
        "",
    ]
    if local:
        lines += [
            "### Local CPU (`configs/local-cpu.yaml`, tiny SD, 2 CPUs)",
            "",
            f"{local['images']} images of 512×1024 with 1, 2 or 4 faces (skimage's astronaut tiled, as in "
            f"docs/benchmarks.md), `{json.dumps(local['params'])}`.",
            "",
            "| run | images/s | faces/s | wall | mean crops per UNet call (calls by size) | busy cores |",
            "|---|---|---|---|---|---|",
        ]
        for batch in local.get("batch_actors") or [{"actors": 1, **local["batch"]}]:
            actors = f"{batch['actors']} refine actor{'s' if batch['actors'] > 1 else ''}"
            lines += [
                f"| batch job, {actors}, steady | {fmt(batch['steady_images_per_s'])} | "
                f"{fmt(batch['steady_faces_per_s'])} | — | {batch['mean_unet_batch']} "
                f"({sizes(batch['unet_batch_sizes'])}) | {batch['busy_cores']} |",
                f"| batch job, {actors}, end to end | {fmt(batch['images_per_s'])} | {fmt(batch['faces_per_s'])} | "
                f"{batch['wall_s']} s | | |",
            ]
        for run in local["service"]:
            lines.append(
                f"| service, {run['clients']} HTTP client{'s' if run['clients'] > 1 else ''} | "
                f"{fmt(run['images_per_s'])} | {fmt(run['faces_per_s'])} | {run['wall_s']} s | "
                f"{run['mean_unet_batch']} ({sizes(run['unet_batch_sizes'])}) | {run['busy_cores']} |"
            )
        lines += ["", f"Service start-up (not counted above): {local['service_startup_s']} s."]
        if "resume_rerun" in local:
            rerun = local["resume_rerun"]
            lines.append(
                f"The same job run again on its complete OUTPUT (resume, the default): {rerun['skipped']} of "
                f"{rerun['inputs']} inputs skipped in {rerun['wall_s']} s, no Ray started."
            )
        lines.append("")
    overhead = results.get("resume")
    if overhead:
        lines += [
            "### Resume overhead",
            "",
            f"A job of {overhead['inputs']:,} inputs (local disk), every one recorded — half in "
            f"`manifest.parquet`, half in {overhead['journal_files']:,} journal files (a run killed before "
            f"compaction) — run again: {overhead['skipped']:,} skipped in {overhead['wall_s']} s "
            "(config and parameter checks, listing INPUT and OUTPUT, reading manifest and journal, compacting). "
            "This is the whole cost of resuming before the first image is detailed; during a run the journal "
            "costs one small Parquet file per batch of images.",
            "",
        ]
    if sims:
        lines += [
            "### Simulated GPUs (`configs/gpu.yaml` + `configs/overlays/simulated-cpu.yaml`)",
            "",
            f"`ray.cluster_utils.Cluster`: a head and 1, 2 or 4 worker nodes with one logical GPU each; "
            f"{sims[0]['images'] // sims[0]['gpu_nodes']} textured 256-px images per GPU node, one face each "
            f"(the simulated detector), `{json.dumps(SIM_PARAMS)}`: one 512×512 crop per image, 20 steps of "
            "modelled A100 UNet time. The batch job's pools come from the config (detector 0.1 GPU, inpainter 0.7 GPU, "
            "autoscaling bounds); the service runs one inpainter replica per GPU node and "
            f"{SIM_CLIENTS_PER_NODE} closed-loop clients per GPU node.",
            "",
            "| GPU nodes | batch images/s (steady) | batch end to end | × 1 node (steady) | mean crops per UNet call "
            "| service images/s | mean crops per UNet call (service) |",
            "|---|---|---|---|---|---|---|",
        ]
        base = sims[0]["batch"]["steady_images_per_s"] or sims[0]["batch"]["images_per_s"]
        for run in sims:
            batch, service = run["batch"], run.get("service", {})
            steady = batch["steady_images_per_s"] or batch["images_per_s"]
            lines.append(
                f"| {run['gpu_nodes']} | {fmt(batch['steady_images_per_s'])} | {fmt(batch['images_per_s'])} "
                f"({batch['wall_s']} s) | {steady / base:.2f}× | {batch['mean_unet_batch']} "
                f"({sizes(batch['unet_batch_sizes'])}) | {fmt(service.get('images_per_s'))} | "
                f"{service.get('mean_unet_batch')} ({sizes(service.get('unet_batch_sizes', {}))}) |"
            )
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def sizes(found: dict[Any, int]) -> str:
    return ", ".join(f"{size}: {count}" for size, count in sorted(found.items(), key=lambda item: int(item[0])))


def write_doc(results: dict[str, Any]) -> None:
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + render(results) + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render-from", type=Path, help="re-render docs/batch.md from saved numbers")
    parser.add_argument("--local-images", type=int, default=24)
    parser.add_argument("--local-actors", type=int, nargs="+", default=list(LOCAL_ACTORS))
    parser.add_argument("--nodes", type=int, nargs="+", default=list(SIM_NODES))
    parser.add_argument("--sim-images-per-node", type=int, default=SIM_IMAGES_PER_NODE)
    parser.add_argument("--resume-inputs", type=int, default=RESUME_INPUTS)
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--skip-simulated", action="store_true")
    parser.add_argument("--wait-idle-s", type=float, default=120.0)
    parser.add_argument("--json", type=Path, default=RESULTS)
    opts = parser.parse_args()
    if opts.render_from:
        write_doc(json.loads(opts.render_from.read_text()))
        return
    from deployments.runtime_env import apply_offline_env

    apply_offline_env()
    os.environ.setdefault("FACEDETAILER_TINY_MODELS", str(REPO / ".cache" / "tests" / "tiny-models"))
    from deployments.testing.build_tiny_models import build_component, default_tiny_models_dir

    for component in ("sd", "sd_alt", "controlnet"):
        build_component(component, default_tiny_models_dir() / component)
    idle = wait_for_idle(opts.wait_idle_s, 0.5)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {**machine_info(), "platform": platform.platform()},
        "conditions": {"loadavg_before": [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]], **idle},
    }
    monitor = ForeignLoadMonitor()
    monitor.start()
    try:
        with tempfile.TemporaryDirectory(prefix="fd-batch-bench-") as tmp:
            if not opts.skip_resume:
                log(f"resume overhead: {opts.resume_inputs} recorded inputs")
                results["resume"] = resume_overhead(Path(tmp), opts.resume_inputs)
                log(f"  {results['resume']}")
            if not opts.skip_local:
                results["local"] = local_cpu(opts, Path(tmp))
            if not opts.skip_simulated:
                results["simulated"] = simulated(opts, Path(tmp))
    finally:
        results["conditions"]["foreign"] = monitor.stop()
        results["conditions"]["loadavg_after"] = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    opts.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_doc(results)
    log(f"wrote {opts.json} and {DOC}")


if __name__ == "__main__":
    main()
