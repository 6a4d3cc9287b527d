#!/usr/bin/env python
"""Continuous batching benchmark of the inpainter (issue 9, part 7).

Two measurements, each run against whatever code is first on ``sys.path`` (so the old
``@serve.batch`` path can be measured from an export of ``main``, see ``benchmarks/README.md``):

``clients``
    The inpainter deployment alone on a private local Ray instance, driven through its handle
    by 1/4/8/16 closed-loop clients that start staggered and send one crop per request with
    mixed settings (steps 10–40, denoise 0.3–0.7, euler / euler_ancestral / heun, cfg 1 or 7).
    Each level runs for ``--duration`` seconds; throughput, latency and UNet batch sizes are
    measured over the window in which every client is running. ``--model cpu`` uses the tiny
    random-weight SD model on the CPU, ``--model sim`` the simulated accelerator ``sim://sd15``
    (a UNet evaluation of n rows costs a + b·n seconds, asleep), for which the script also
    computes the cost model's ideal: every UNet call carrying ``--ideal-batch`` crops.

``single``
    One FaceDetailer request on a real photo with ``configs/local-cpu.yaml``: in-process
    (``LocalStages``) vs served (handle, HTTP PNG), repetitions interleaved.

``render``
    Writes the "Continuous batching" section of ``docs/benchmarks.md`` from saved JSON files.

    .venv/bin/python benchmarks/continuous_batching.py clients --model sim --json out/sim-engine.json
    .venv/bin/python benchmarks/continuous_batching.py single --json out/single-engine.json
    .venv/bin/python benchmarks/continuous_batching.py render --out docs/benchmarks.md out/*.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from continuous_batching_report import render, sim_device, summarise_single, write_section

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TINY_MODELS = REPO / ".cache" / "tests" / "tiny-models"
SAMPLERS = ("euler", "euler_ancestral", "heun")
CFGS = (1.0, 7.0)
LEVELS = (1, 4, 8, 16)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "YOLO_VERBOSE": "False",
    "YOLO_CONFIG_DIR": "/tmp/facedetailer-ultralytics",
    "FACEDETAILER_OFFLINE": "1",
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def code_under_test() -> dict[str, Any]:
    import deployments

    root = Path(deployments.__file__).resolve().parent.parent
    from deployments import serving

    engine = hasattr(serving.InpainterDeployment, "stats")
    commit = ""
    if (root / ".git").exists():
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()  # fmt: skip
    return {"root": str(root), "path": "engine" if engine else "serve.batch", "commit": commit}


def machine() -> dict[str, Any]:
    import ray
    import torch

    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "loadavg_start": [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]],
    }


# ------------------------------------------------------------------------------------ workload


def workload(seed: int, size: int) -> Any:
    """An endless stream of (job, settings, evaluations, rows per evaluation), one crop per request."""
    from deployments.inpainter import RefineJob, SamplingSettings

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    mask = np.clip(1.6 - 1.6 * np.hypot((y - size / 2) / (size / 2), (x - size / 2) / (size / 2)), 0, 1)
    mask = mask.astype(np.float32)  # same size as the image: the old path requires it
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    index = 0
    while True:
        steps = int(rng.integers(10, 41))
        sampler = SAMPLERS[int(rng.integers(0, len(SAMPLERS)))]
        cfg = CFGS[int(rng.integers(0, len(CFGS)))]
        settings = SamplingSettings(
            steps=steps, denoise=round(float(rng.uniform(0.3, 0.7)), 3), cfg=cfg, sampler_name=sampler,
            scheduler="normal",
        )  # fmt: skip
        job = RefineJob(
            image=images[index % len(images)], noise_mask=mask, positive=("a photo of a face",),
            negative=("blurry",), seed=int(rng.integers(0, 2**31)),
        )  # fmt: skip
        evaluations = 2 * steps - 1 if sampler == "heun" else steps
        yield job, settings, evaluations, 1 if cfg == 1.0 else 2
        index += 1


# ------------------------------------------------------------------------------------ deployment


def bench_deployment() -> Any:
    """The inpainter deployment with a probe: UNet calls (crops, rows) and replica-side timing."""
    from deployments.serving import InpainterDeployment

    class BenchInpainter(InpainterDeployment):
        def __init__(self, model: str, **options: Any) -> None:
            super().__init__(model, **options)
            self.engine_path = hasattr(self, "engine")
            self.calls: list[tuple[int, int]] = []  # old path: (crops, rows) per UNet call
            if not self.engine_path:
                original = self.model._predict

                def predict(model_input: Any, t: Any, conditioning: Any, cfg: float) -> Any:
                    crops = int(model_input.shape[0])
                    self.calls.append((crops, crops if cfg == 1.0 else 2 * crops))
                    return original(model_input, t, conditioning, cfg)

                self.model._predict = predict

        async def timed_refine(self, jobs: list, settings: Any) -> dict[str, Any]:
            started = time.perf_counter()
            result = await self.refine(jobs, settings)
            return {
                "replica_s": time.perf_counter() - started,
                "queue_wait_s": getattr(result, "queue_wait_s", None),
                "engine_evaluations": getattr(result, "unet_evaluations", None),
            }

        def probe(self) -> dict[str, Any]:
            accelerator = getattr(self.model.components.unet, "accelerator", None)  # sim:// only
            busy = accelerator.busy_s if accelerator is not None else None  # UNet + VAE + text, as run
            code = code_under_test()  # what this replica imported, to check against the driver's
            if self.engine_path:
                snapshot = self.engine.snapshot()
                return {"sizes": snapshot["unet_batch_sizes"], "rows": snapshot["unet_rows"], "busy_s": busy,
                        "code": code}  # fmt: skip
            sizes = Counter(crops for crops, _ in self.calls)
            return {"sizes": dict(sizes), "rows": sum(rows for _, rows in self.calls), "busy_s": busy, "code": code}

    return BenchInpainter


def start_ray(env: dict[str, str]) -> None:
    import ray

    os.environ.update(env)
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)


def deploy(model: str, max_batch_size: int) -> Any:
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    options: dict[str, Any] = {"max_batch_size": max_batch_size}
    user_config = {"max_batch_size": max_batch_size}
    deployment = serve.deployment(bench_deployment(), name="Inpainter").options(
        ray_actor_options={"num_cpus": 1, "num_gpus": 0},
        max_ongoing_requests=64,
        user_config=user_config if code_under_test()["path"] == "engine" else None,
    )
    return serve.run(deployment.bind(model, device="cpu", **options), name="cb-bench", route_prefix=None)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def probe_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    sizes = {int(k): int(v) - int(before["sizes"].get(k, before["sizes"].get(int(k), 0)))
             for k, v in after["sizes"].items()}  # fmt: skip
    sizes = {k: v for k, v in sorted(sizes.items()) if v > 0}
    calls = sum(sizes.values())
    evaluations = sum(size * count for size, count in sizes.items())
    return {
        "unet_batch_sizes": sizes,
        "unet_calls": calls,
        "crop_evaluations": evaluations,
        "rows": int(after["rows"]) - int(before["rows"]),
        "mean_batch": evaluations / calls if calls else None,
        "device_busy_s": after["busy_s"] - before["busy_s"] if after.get("busy_s") is not None else None,
    }


async def run_level(
    handle: Any, clients: int, opts: argparse.Namespace, cost: dict[str, float] | None
) -> dict[str, Any]:
    """``clients`` closed-loop clients for ``opts.duration`` s; metrics over the all-running window."""
    streams = [workload(1000 * clients + client, opts.size) for client in range(clients)]
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    window_start = t0 + (clients - 1) * opts.stagger + opts.warmup
    window_end = t0 + (clients - 1) * opts.stagger + opts.warmup + opts.duration
    probes: dict[str, Any] = {}

    async def client(index: int) -> None:
        await asyncio.sleep(index * opts.stagger)
        stream = streams[index]
        while time.perf_counter() < window_end:
            job, settings, evaluations, rows = next(stream)
            # a lone client: the simulated device's busy time around each request is that request's
            busy_before = (await handle.probe.remote())["busy_s"] if clients == 1 else None
            started = time.perf_counter()
            reply = await handle.timed_refine.remote([job], settings)
            ended = time.perf_counter()
            busy = None
            if busy_before is not None:
                busy = (await handle.probe.remote())["busy_s"] - busy_before
            records.append({"client": index, "start": started - t0, "end": ended - t0, "latency": ended - started,
                            "evaluations": evaluations, "rows": rows, "steps": settings.steps,
                            "device_busy_s": busy, **reply})  # fmt: skip

    async def probe_at(moment: float, name: str) -> None:
        await asyncio.sleep(max(0.0, moment - time.perf_counter()))
        probes[name] = await handle.probe.remote()

    probing = [probe_at(window_start, "start"), probe_at(window_end, "end")]
    await asyncio.gather(*(client(i) for i in range(clients)), *probing)
    window = window_end - window_start
    inside = [r for r in records if window_start - t0 <= r["end"] <= window_end - t0]
    calls = probe_delta(probes["start"], probes["end"])
    latencies = [r["latency"] for r in inside]
    result: dict[str, Any] = {
        "clients": clients,
        "window_s": window,
        "requests_in_window": len(inside),
        "requests_total": len(records),
        "throughput_rps": len(inside) / window,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
        "queue_wait_p50_s": percentile([r["queue_wait_s"] for r in inside if r["queue_wait_s"] is not None], 0.5),
        "unet": calls,
        "records": records,
    }
    if cost is not None:
        a, b, area = cost["a"], cost["b"], cost["area"]
        ideal = opts.ideal_batch
        # the UNet work done in the window, at the cost model's price with every call carrying `ideal` crops
        ideal_busy = calls["crop_evaluations"] * a / ideal + b * calls["rows"] * area
        actual_busy = calls["unet_calls"] * a + b * calls["rows"] * area
        # the VAE (and text) work has no batching price: at the ideal it costs what it did (0 unless set;
        # the asynchronous device's busy time is exactly the modelled time, the synchronous one's is not)
        other_busy = 0.0 if opts.sim_sync else max(0.0, (calls["device_busy_s"] or actual_busy) - actual_busy)
        ideal_busy += other_busy
        vae_per_crop = (cost.get("vae_encode", 0.0) + cost.get("vae_decode", 0.0)) * area
        mean_request = statistics.fmean(r["evaluations"] * (a / ideal + b * r["rows"] * area) + vae_per_crop
                                        for r in records)  # fmt: skip
        result["cost_model"] = {
            "ideal_batch": ideal,
            "ideal_throughput_rps": 1.0 / mean_request,
            "work_efficiency": ideal_busy / window,  # UNet work at batch `ideal` price / wall time
            "modelled_busy_fraction": (actual_busy + other_busy) / window,
            "vae_and_text_busy_s": other_busy,
        }
        # latency above the request's own modelled UNet time (the lone-crop figure at 1 client), and
        # above everything the simulated device ran for it (UNet, VAE and text stand-ins, as run)
        overheads = [r["latency"] - r["evaluations"] * (a + b * r["rows"] * area) for r in records]
        beyond_device = [r["latency"] - r["device_busy_s"] for r in records if r["device_busy_s"] is not None]
        result["cost_model"]["latency_minus_model_time_s"] = {
            "p50": percentile(overheads, 0.5), "max": max(overheads) if overheads else None,
        }  # fmt: skip
        if beyond_device:
            result["cost_model"]["latency_minus_device_busy_s"] = {
                "p50": percentile(beyond_device, 0.5), "max": max(beyond_device),
            }  # fmt: skip
    return result


def run_clients(opts: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    env = dict(OFFLINE_ENV, FACEDETAILER_TINY_MODELS=str(opts.tiny_models), OMP_NUM_THREADS=str(opts.threads))
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    cost = None
    if opts.model == "sim":
        from deployments import simulated

        cost = {"a": opts.sim_a or simulated.UNET_A_S, "b": opts.sim_b or simulated.UNET_B_S,
                "area": (opts.size // 8) ** 2 / simulated.REFERENCE_LATENT_AREA,
                "vae_encode": opts.sim_vae_encode, "vae_decode": opts.sim_vae_decode}  # fmt: skip
        model = f"sim://sd15?a={cost['a']}&b={cost['b']}" + ("&sync=1" if opts.sim_sync else "")
        if opts.sim_vae_encode or opts.sim_vae_decode:
            model += f"&vae_encode={opts.sim_vae_encode}&vae_decode={opts.sim_vae_decode}"
    else:
        from deployments.testing.build_tiny_models import build_component

        model = build_component("sd", Path(opts.tiny_models) / "sd")["pipeline"]
    start_ray(env)
    try:
        handle = deploy(model, opts.max_batch_size)
        replica_code = handle.probe.remote().result(timeout_s=120)["code"]
        if replica_code["root"] != code_under_test()["root"]:
            raise RuntimeError(f"the replica imported {replica_code} but the driver {code_under_test()}: run from "
                               "the code's own directory (Ray puts the driver's working directory on workers' path)")
        log(f"deployed {model} ({replica_code['path']} path, {replica_code['root']}); warming up")
        warm = workload(7, opts.size)
        for _ in range(2):
            job, settings, _, _ = next(warm)
            handle.timed_refine.remote([job], settings).result(timeout_s=600)
        levels = []
        for clients in opts.clients:
            log(f"{clients} clients")
            level = asyncio.run(run_level(handle, clients, opts, cost))
            levels.append(level)
            log(f"  {level['throughput_rps']:.3f} req/s, mean UNet batch {level['unet']['mean_batch']}, "
                f"p50 {level['latency_p50_s']}")  # fmt: skip
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    return {"benchmark": "clients", "model": opts.model, "model_reference": model, "cost": cost,
            "device": sim_device(opts.sim_sync) if opts.model == "sim" else None,
            "size": opts.size, "max_batch_size": opts.max_batch_size, "levels": levels}  # fmt: skip


# ------------------------------------------------------------------------------------ lone crop in-process


def run_lone(opts: argparse.Namespace) -> dict[str, Any]:
    """Lone crops on ``sim://`` in this process (no Ray): the engine's own overhead beyond model time."""
    import torch

    from deployments import simulated
    from deployments.model_loading import load_inpainter

    torch.set_num_threads(opts.threads)
    cost = {"a": simulated.UNET_A_S, "b": simulated.UNET_B_S, "area": (opts.size // 8) ** 2 / 4096,
            "vae_encode": opts.vae_encode, "vae_decode": opts.vae_decode}  # fmt: skip
    reference = f"sim://sd15?a={cost['a']}&b={cost['b']}&vae_encode={opts.vae_encode}&vae_decode={opts.vae_decode}"
    reference += "&sync=1" if opts.sim_sync else ""
    inpainter = load_inpainter(reference, device="cpu")
    accelerator = inpainter.components.unet.accelerator
    stream = workload(99, opts.size)
    records = []
    for index in range(opts.requests + 2):
        job, settings, evaluations, rows = next(stream)
        busy = accelerator.busy_s
        started = time.perf_counter()
        inpainter.refine([job], settings)
        latency = time.perf_counter() - started
        if index < 2:  # warm-up
            continue
        model = evaluations * (cost["a"] + cost["b"] * rows * cost["area"])
        records.append({"latency": latency, "evaluations": evaluations, "rows": rows, "steps": settings.steps,
                        "sampler": settings.sampler_name, "model_s": model,
                        "device_busy_s": accelerator.busy_s - busy})  # fmt: skip
    beyond_model = [r["latency"] - r["model_s"] for r in records]
    beyond_device = [r["latency"] - r["device_busy_s"] for r in records]
    per_evaluation = [(r["latency"] - r["device_busy_s"]) / r["evaluations"] for r in records]
    return {
        "benchmark": "lone", "model": "sim", "model_reference": reference, "device": sim_device(opts.sim_sync),
        "cost": cost, "size": opts.size,
        "records": records,
        "latency_minus_model_time_s": {"p50": percentile(beyond_model, 0.5), "max": max(beyond_model)},
        "latency_minus_device_busy_s": {"p50": percentile(beyond_device, 0.5), "max": max(beyond_device)},
        "overhead_per_evaluation_s": {"p50": percentile(per_evaluation, 0.5)},
    }  # fmt: skip


# ------------------------------------------------------------------------------------ single request


def _server_timing(header: str) -> dict[str, float]:
    """``Server-Timing: detect;dur=12.3, …`` → ``{"detect": 0.0123, …}``."""
    timings = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            timings[name] = float(duration) / 1000
    return timings


def cpu_clock() -> tuple[float, float, float]:
    """CPU seconds since boot: the machine busy, this process and its descendants, this process alone.

    Ray's processes (GCS, raylet, workers, replicas) descend from the driver that started the local
    instance, so the difference of the two over a sample is CPU taken by *other* processes: load
    from outside the benchmark that distorts that sample.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / ticks
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(rest[1])
        cpu[pid] = (int(rest[11]) + int(rest[12])) / ticks  # utime + stime
    own = {os.getpid()}
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in own and pid not in own:
                own.add(pid)
                changed = True
    return busy, sum(cpu.get(pid, 0.0) for pid in own), cpu.get(os.getpid(), 0.0)


SINGLE_PARAMS = {"steps": 20, "guide_size": 256, "max_size": 512, "seed": 0}


def _single_threads(config: Path) -> int:
    from serve_app.cli import load_config

    [application] = load_config(config, (), ())["applications"]
    return int(application["runtime_env"]["env_vars"].get("OMP_NUM_THREADS", 1))


def _in_process_runner(config: Path, tiny_models: Path) -> Any:
    """The config's first detector and inpainter checkpoint loaded here; a function running one request.

    It returns (wall s, stage timings, UNet seconds, torch threads of the engine's thread).
    """
    import torch
    from PIL import Image

    from deployments.model_loading import load_detector, load_inpainter
    from deployments.testing import assets
    from deployments.testing.build_tiny_models import build_component
    from facedetailer.params import FaceDetailerParams
    from serve_app.cli import load_config
    from serve_app.config import AppArgs
    from serve_app.local import LocalStages

    os.environ.update(OFFLINE_ENV, FACEDETAILER_TINY_MODELS=str(tiny_models))
    [application] = load_config(config, (), ())["applications"]
    args = AppArgs.model_validate(application["args"])
    threads = _single_threads(config)
    build_component("sd", Path(tiny_models) / "sd")
    detector = next(iter(args.named_detectors().values()))
    checkpoint = next(iter(args.inpainter.named_checkpoints().values()))
    paint = args.inpainter
    torch.set_num_threads(threads)
    inpainter = load_inpainter(  # the served replica's first checkpoint, with the same options
        checkpoint.model, single_file_config=checkpoint.single_file_config, device=paint.device, dtype=paint.dtype,
        max_batch_size=paint.max_batch_size, max_queued_crops=paint.max_queued_crops,
        controlnets={name: spec.model_dump() for name, spec in (args.controlnets or {}).items()},
    )  # fmt: skip
    stages = LocalStages(
        detector=load_detector(detector.model, task="detect", imgsz=detector.imgsz, device=detector.device),
        inpainter=inpainter,
    )
    image = np.ascontiguousarray(np.asarray(Image.fromarray(assets.astronaut())))
    resolved = FaceDetailerParams(**SINGLE_PARAMS)

    def run() -> tuple[float, dict[str, float], float, int | None]:
        torch.set_num_threads(threads)  # ultralytics resets it process-wide
        before = inpainter.engine.stats.unet_seconds
        started = time.perf_counter()
        result = stages.detail([image], resolved)
        wall = time.perf_counter() - started
        engine = inpainter.engine
        return wall, dict(result.timings), engine.stats.unet_seconds - before, engine.torch_threads

    return run


def _in_process_worker(connection: Any, config: str, tiny_models: str) -> None:
    """``single``'s in-process side in a clean process (no Ray): one request per message."""
    run = _in_process_runner(Path(config), Path(tiny_models))
    connection.send("ready")
    while connection.recv():
        connection.send(run())


def run_single(opts: argparse.Namespace) -> dict[str, Any]:
    """One request on a real photo: in-process vs served (handle, HTTP PNG), in interleaved pairs.

    Every repetition runs the three paths back to back (in-process first in even repetitions, last
    in odd ones), so each served sample has an in-process sample taken under the same load: the
    per-pair ratio's median and quartiles are the figure. Each sample records the pipeline's stage
    ``timings`` (HTTP: the ``Server-Timing`` header) and the UNet seconds its engine ran, so what
    serving adds can be told per stage. The in-process run happens while the Ray instance is up
    (its replicas idle), as the served run has the driver idle: both share the machine the same way.
    By default the in-process side runs in a clean child process without Ray, as a user's script
    would: in the benchmark's own driver (``--in-process driver``), next to Ray's driver threads and
    the Serve handle, the same work beyond the UNet ran ~50 ms slower, which flattered the served side.
    """
    import httpx
    from PIL import Image
    from ray import serve

    from deployments.testing import assets
    from serve_app.app import APP_NAME
    from serve_app.cli import start_serving

    config = REPO / "configs" / "local-cpu.yaml"
    os.environ.update(OFFLINE_ENV, FACEDETAILER_TINY_MODELS=str(opts.tiny_models))
    image = np.ascontiguousarray(np.asarray(Image.fromarray(assets.astronaut())))
    threads, params = _single_threads(config), dict(SINGLE_PARAMS)
    if opts.in_process == "driver":
        run_local = _in_process_runner(config, opts.tiny_models)
        worker = None
    else:  # a clean Python process without Ray, driven over a pipe (its own wall clock)
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        connection, child = context.Pipe()
        worker = context.Process(target=_in_process_worker, args=(child, str(config), str(opts.tiny_models)),
                                 daemon=True)  # fmt: skip
        worker.start()
        if not connection.poll(600) or connection.recv() != "ready":
            raise RuntimeError("the in-process worker did not start")

        def run_local() -> tuple[float, dict[str, float], float, int | None]:
            connection.send(True)
            if not connection.poll(600):
                raise RuntimeError("the in-process worker did not answer")
            return connection.recv()

    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    png = buffer.getvalue()
    handle, port = start_serving(config, port=free_port(), join_cluster=False)
    paths = ("in-process", "handle", "http-png")
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    threads_seen: dict[str, Any] = {}
    try:
        served = handle.info.remote().result(timeout_s=120)["models"]["inpainter"]
        served_path = "engine" if "engine" in served else "serve.batch"
        if served_path != code_under_test()["path"]:
            raise RuntimeError(f"the served inpainter runs the {served_path} path, the driver imported "
                               f"{code_under_test()}: run from the code's own directory")  # fmt: skip
        replica = serve.get_deployment_handle("Inpainter", APP_NAME)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=300) as client:

            def in_process() -> tuple[dict[str, float], float, int | None]:
                return run_local()[1:]

            def via_handle() -> dict[str, float]:
                return dict(handle.detail.remote(image, params).result(timeout_s=300).timings)

            def via_http() -> dict[str, float]:
                response = client.post("/v1/detail", files={"image": ("a.png", png, "image/png")},
                                       data={"params": json.dumps(params)})  # fmt: skip
                response.raise_for_status()
                return _server_timing(response.headers["Server-Timing"])

            calls = {"handle": via_handle, "http-png": via_http}
            for function in (in_process, via_handle, via_http):  # warm-up
                for _ in range(opts.warmup):
                    function()
            for repetition in range(opts.repeats):
                order = paths if repetition % 2 == 0 else tuple(reversed(paths))
                for name in order:
                    # the wall time is the call alone; the engine probes around it are not timed
                    clock = cpu_clock()
                    if name == "in-process":
                        wall, timings, unet_s, torch_threads = run_local()
                    else:
                        before = replica.snapshot.remote().result(timeout_s=60)
                        started = time.perf_counter()
                        timings = calls[name]()
                        wall = time.perf_counter() - started
                        after = replica.snapshot.remote().result(timeout_s=60)
                        unet_s = after["unet_seconds"] - before["unet_seconds"]
                        torch_threads = after.get("torch_threads")
                    busy, own, driver = (now - then for now, then in zip(cpu_clock(), clock, strict=True))
                    threads_seen.setdefault(name, set()).add(torch_threads)
                    samples[name].append({"wall": wall, "timings": timings, "unet_s": unet_s, "repetition": repetition,
                                          "foreign_cpu_s": max(0.0, busy - own),
                                          "ray_cpu_s": own - driver, "driver_cpu_s": driver})  # fmt: skip
                log(f"  repetition {repetition + 1}/{opts.repeats}: "
                    + ", ".join(f"{name} {samples[name][-1]['wall']:.3f} s" for name in paths))  # fmt: skip
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    return summarise_single(
        {"benchmark": "single", "params": params, "paths": list(paths), "samples": samples, "threads": threads,
         "engine_torch_threads": {name: sorted(v for v in seen if v is not None)
                                  for name, seen in threads_seen.items()},
         "in_process_with_ray_up": True, "warmup": opts.warmup}  # fmt: skip
    )


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    clients = commands.add_parser("clients", help="1/4/8/16 clients on the inpainter deployment")
    clients.add_argument("--model", choices=("cpu", "sim"), required=True)
    clients.add_argument("--clients", type=lambda text: [int(v) for v in text.split(",")], default=list(LEVELS))
    clients.add_argument("--duration", type=float, default=30.0, help="measured window per level (s)")
    clients.add_argument("--warmup", type=float, default=3.0, help="after the last client started (s)")
    clients.add_argument("--stagger", type=float, default=0.25, help="seconds between client starts")
    clients.add_argument("--size", type=int, default=None, help="crop side (default: cpu 128, sim 512)")
    clients.add_argument("--max-batch-size", type=int, default=8)
    clients.add_argument("--ideal-batch", type=int, default=8)
    clients.add_argument("--sim-a", type=float, default=None)
    clients.add_argument("--sim-b", type=float, default=None)
    clients.add_argument("--sim-sync", action="store_true", help="the synchronous sim:// device (sync=1)")
    clients.add_argument("--sim-vae-encode", type=float, default=0.0,
                         help="sim:// VAE encode, s per 512² image (default 0: free; published: 0.015)")
    clients.add_argument("--sim-vae-decode", type=float, default=0.0, help="… decode (published: 0.031)")
    clients.add_argument("--threads", type=int, default=None,
                         help="OMP_NUM_THREADS of the replica (cpu: 2; sim: 1, as configs/overlays/simulated-cpu.yaml)")
    clients.add_argument("--tiny-models", type=Path, default=DEFAULT_TINY_MODELS)
    clients.add_argument("--json", type=Path, required=True)
    single = commands.add_parser("single", help="one request served vs in-process (CPU)")
    single.add_argument("--repeats", type=int, default=30, help="interleaved repetitions (pairs)")
    single.add_argument("--warmup", type=int, default=2, help="warm-up calls per path")
    single.add_argument("--in-process", choices=("subprocess", "driver"), default="subprocess",
                        help="run the in-process side in a clean process without Ray, or in the benchmark's "
                             "own driver process (which also holds Ray's driver and the Serve handle)")  # fmt: skip
    single.add_argument("--tiny-models", type=Path, default=DEFAULT_TINY_MODELS)
    single.add_argument("--json", type=Path, required=True)
    lone = commands.add_parser("lone", help="lone crops on sim:// in-process: the engine's overhead")
    lone.add_argument("--requests", type=int, default=30)
    lone.add_argument("--size", type=int, default=512)
    lone.add_argument("--threads", type=int, default=1)
    lone.add_argument("--sim-sync", action="store_true", help="the synchronous sim:// device (sync=1)")
    lone.add_argument("--vae-encode", type=float, default=0.0,
                      help="sim:// VAE encode, s per 512² image (0: free, the default; published RTX 4090 "
                           "figure: 0.015, see docs/simulated.md)")  # fmt: skip
    lone.add_argument("--vae-decode", type=float, default=0.0, help="… decode (published: 0.031)")
    lone.add_argument("--json", type=Path, required=True)
    rendering = commands.add_parser("render", help="write the docs section from saved runs")
    rendering.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    rendering.add_argument("--notes", type=Path, help="Markdown inserted after the targets table")
    rendering.add_argument("files", type=Path, nargs="+")
    opts = parser.parse_args()

    if opts.command == "render":
        write_section(opts.out, render(opts.files, opts.notes))
        return
    started = time.time()
    load_at_start = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    if opts.command == "clients":
        opts.size = opts.size or (512 if opts.model == "sim" else 128)
        opts.threads = opts.threads or (1 if opts.model == "sim" else 2)
        result = run_clients(opts)
        result["options"] = {key: value for key, value in vars(opts).items() if key not in ("json",)}
        result["options"] = json.loads(json.dumps(result["options"], default=str))
    elif opts.command == "lone":
        result = run_lone(opts)
    else:
        result = run_single(opts)
    result["code"] = code_under_test()
    result["machine"] = machine()
    result["machine"]["loadavg_start"] = load_at_start
    result["machine"]["loadavg_end"] = [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    result["started"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    result["seconds"] = round(time.time() - started, 1)
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(result, indent=1, default=float))
    log(f"wrote {opts.json}")


if __name__ == "__main__":
    main()
