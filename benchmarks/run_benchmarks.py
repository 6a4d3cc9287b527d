#!/usr/bin/env python
"""Throughput benchmark of the served FaceDetailer graph on the CPU config (issue 5, part 2).

One command measures, in one run, against ``configs/local-cpu.yaml`` (real face YOLO, LiteMedSAM,
tiny random-weight SD inpainter):

(a) the served graph over HTTP (and through the Python handle) vs the same cycle in-process;
(b) images with 1, 2, 4, 8 faces: time relative to 1 face, faces batched vs one by one;
(c) 1, 4, 8 concurrent HTTP clients: faces/s relative to sequential, plus inpainter batching
    variants;
(d) the per-stage breakdown (decode, detect, SAM, inpaint, blend, encode) and the hops.

It writes the raw numbers to ``benchmarks/results.json`` and the write-up to ``--out``
(``docs/benchmarks.md``). See ``benchmarks/README.md``.

    .venv/bin/python benchmarks/run_benchmarks.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "local-cpu.yaml"
DEFAULT_TINY_MODELS = REPO / ".cache" / "tests" / "tiny-models"
APP_NAME = "facedetailer"
FACE_COUNTS = (1, 2, 4, 8)
GRID = (2, 4)  # rows, columns of 256-px tiles: every test image is 512×1024
TILE = 256  # px: one astronaut per tile; its crop (bbox × crop_factor 3) stays inside the tile
FACE_TILES = (0, 7, 2, 5, 1, 6, 3, 4)  # which tiles hold a face, in order; the others show coffee
TARGETS = {"a": 1.15, "b": 0.6, "c": 2.5}


# ------------------------------------------------------------------------------------------ utils


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in samples]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "samples": [round(v, 4) for v in values],
    }


def fmt_s(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """``1.23 s (1.20–1.30)``: median and the spread (min–max) over the repetitions."""
    if not stat:
        return "—"
    if stat["n"] == 1:
        return f"{stat['median']:.{digits}f} s"
    return f"{stat['median']:.{digits}f} s ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


class CpuMeter:
    """Average number of busy cores over a block (the whole machine, every process)."""

    def __enter__(self) -> CpuMeter:
        self.start = cpu_jiffies()
        self.cores = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        busy, total = cpu_jiffies()
        d_busy, d_total = busy - self.start[0], total - self.start[1]
        self.cores = (os.cpu_count() or 1) * d_busy / d_total if d_total else 0.0


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def call_with_timeout(function: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run a call that has no timeout of its own (e.g. ``serve.run``) in a daemon thread, bounded."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = function()
        except BaseException as error:  # re-raised in the caller
            box["error"] = error

    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for_idle(max_wait_s: float, threshold: float) -> dict[str, Any]:
    """Wait (bounded) until the machine's busy cores over a 5 s window drop below ``threshold``."""
    start = time.monotonic()
    busy = 0.0
    while True:
        with CpuMeter() as meter:
            time.sleep(5)
        busy = meter.cores
        if busy < threshold or time.monotonic() - start >= max_wait_s:
            break
    return {"waited_s": round(time.monotonic() - start, 1), "busy_cores_at_start": round(busy, 2)}


class ForeignLoadMonitor:
    """Samples every 2 s whether a pytest session (someone else's work) runs next to the benchmark."""

    def __init__(self) -> None:
        self.samples = 0
        self.with_pytest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="foreign-load", daemon=True)

    def _pytest_running(self) -> bool:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"pytest" in cmdline:
                return True
        return False

    def _loop(self) -> None:
        while not self._stop.wait(2.0):
            self.samples += 1
            self.with_pytest += self._pytest_running()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        return {"samples": self.samples, "with_pytest_running": self.with_pytest}


# ---------------------------------------------------------------------------------------- machine


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    import diffusers
    import onnxruntime
    import ray
    import torch
    import ultralytics

    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    dirty = [line[3:] for line in _run(["git", "status", "--porcelain"]).splitlines() if line]
    return {
        "nproc": os.cpu_count(),
        "nproc_cmd": _run(["nproc"]),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "gpu": "none",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "torch": torch.__version__,
        "torch_threads_in_process": torch.get_num_threads(),
        "ray": ray.__version__,
        "diffusers": diffusers.__version__,
        "ultralytics": ultralytics.__version__,
        "onnxruntime": onnxruntime.__version__,
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        "git_uncommitted": dirty,
    }


# ----------------------------------------------------------------------------------------- images


def tiled_faces(count: int) -> np.ndarray:
    """A 2×4 canvas of 256-px tiles, ``count`` of them an astronaut, the others skimage's coffee photo.

    Every image has the same size, so the detector (which letterboxes to 640 px) sees each face at the
    same scale and every face gets (nearly) the same crop, whatever the count.
    """
    from PIL import Image
    from skimage import data

    from deployments.testing import assets

    def tile(image: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(image).resize((TILE, TILE), Image.Resampling.LANCZOS))

    face, filler = tile(assets.astronaut()), tile(data.coffee())
    tiles = [filler] * (GRID[0] * GRID[1])
    for index in FACE_TILES[:count]:
        tiles[index] = face
    rows = [np.concatenate(tiles[r * GRID[1] : (r + 1) * GRID[1]], axis=1) for r in range(GRID[0])]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


def check_faces(stages: Any, image: np.ndarray, params: Any, expected: int) -> dict[str, Any]:
    """Assert the detector finds exactly ``expected`` faces and that no two crop regions overlap."""
    from facedetailer.guide_size import plan_upscale
    from facedetailer.segs import detections_to_segs
    from facedetailer.waves import refinement_waves

    detections = stages.detector.detect(image, params.bbox_threshold)
    segs = detections_to_segs(
        image, detections, dilation=params.bbox_dilation, crop_factor=params.bbox_crop_factor,
        drop_size=params.drop_size,
    )
    regions = [tuple(int(v) for v in seg.crop_region) for seg in segs.segs]
    assert len(regions) == expected, f"{expected}-face image: the detector found {len(regions)} faces"
    waves = refinement_waves(regions)
    assert len(waves) == (1 if expected else 0), f"{expected}-face image: crops overlap ({len(waves)} waves)"
    sampled = []
    for seg, (x1, y1, x2, y2) in zip(segs.segs, regions, strict=True):
        plan = plan_upscale(
            (x2 - x1, y2 - y1), seg.bbox, guide_size=params.guide_size, guide_size_for_bbox=params.guide_size_for,
            max_size=params.max_size, force_inpaint=params.force_inpaint,
        )
        sampled.append(list(plan.new_size))
    return {"crop_regions": regions, "sampled_sizes": sampled}


# ------------------------------------------------------------------------------------ measurement


class Bench:
    """Holds the in-process models, the served app and the HTTP client for one run."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.config = yaml.safe_load(Path(opts.config).read_text())
        [application] = [a for a in self.config["applications"] if a.get("name") == APP_NAME]
        self.env_vars = {k: str(v) for k, v in application.get("runtime_env", {}).get("env_vars", {}).items()}
        self.env_vars["FACEDETAILER_TINY_MODELS"] = os.environ["FACEDETAILER_TINY_MODELS"]
        self.threads = int(self.env_vars.get("OMP_NUM_THREADS", "1"))
        self.params: dict[str, Any] = {
            "steps": opts.steps,
            "guide_size": opts.guide_size,
            "max_size": opts.max_size,
            "seed": 0,
        }
        self.sam_params = {**self.params, "use_sam": True, "sam_detection_hint": "none"}
        self.started = time.monotonic()
        self.results: dict[str, Any] = {}
        self.handle: Any = None
        self.url = ""
        self.client: Any = None
        self.thread_drift = False  # whether torch's thread count changed during an in-process call

    # -- set-up ---------------------------------------------------------------------------------
    def app_args(self) -> Any:
        from serve_app.app import app_args_from_config

        return app_args_from_config(self.config).model_copy(deep=True)

    def load_in_process(self) -> None:
        import torch

        from deployments.model_loading import load_detector, load_inpainter, load_segmenter
        from serve_app.local import LocalStages

        args = self.app_args()
        started = time.perf_counter()
        detector = load_detector(
            args.detector.model, task=args.detector.task, imgsz=args.detector.imgsz, device=args.detector.device
        )
        sam = load_segmenter(args.sam.checkpoint, model_type=args.sam.model_type, device=args.sam.device)
        paint = args.inpainter
        inpainter = load_inpainter(
            paint.model, single_file_config=paint.single_file_config, device=paint.device, dtype=paint.dtype,
            lora_dir=paint.lora_dir, max_batch_size=paint.max_batch_size,
        )
        self.local = LocalStages(detector=detector, inpainter=inpainter, sam=sam)
        torch.set_num_threads(self.threads)  # the replicas run with OMP_NUM_THREADS from the config
        self.results["in_process_load_s"] = round(time.perf_counter() - started, 2)
        self.results["in_process_torch_threads"] = torch.get_num_threads()

    def start_serving(self) -> None:
        import httpx
        import ray

        from serve_app.cli import start_serving

        started = time.perf_counter()
        # A fresh local Ray instance of our own. (start_serving's ray.init(address="auto") would
        # join any Ray instance already running on this machine, e.g. a test session's.)
        ray.init(
            address="local", num_cpus=os.cpu_count(), include_dashboard=False,
            runtime_env={"env_vars": self.env_vars}, log_to_driver=False,
        )
        port = free_port()
        self.handle, port = call_with_timeout(
            lambda: start_serving(Path(self.opts.config), port=port), self.opts.deploy_timeout_s, "start_serving"
        )
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=self.opts.request_timeout_s, trust_env=False)
        deadline = time.monotonic() + 120
        while self.client.get("/healthz").status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("/healthz did not turn 200 within 120 s")
            time.sleep(1)
        self.results["serve_startup_s"] = round(time.perf_counter() - started, 2)

    def inpainter_handle(self) -> Any:
        from ray import serve

        return serve.get_deployment_handle("Inpainter", app_name=APP_NAME)

    def inpainter_batching(self) -> dict[str, Any]:
        """The inpainter's batching knobs (and recent batch sizes when the deployment reports them)."""
        handle = self.inpainter_handle()
        info = handle.info.remote().result(timeout_s=60)
        out = {k: info.get(k) for k in ("max_batch_size", "batch_wait_timeout_s")}
        try:
            stats = handle.batching_stats.remote().result(timeout_s=60)
            out["recent_model_calls"] = list(stats.get("recent_model_calls", []))
        except Exception:  # optional: older deployments have no batching_stats
            pass
        return out

    def last_inpainter_call(self, path: str) -> dict[str, Any]:
        if path == "in_process":
            return dict(self.local.inpainter.last_call)
        return dict(self.inpainter_handle().info.remote().result(timeout_s=60)["last_call"])

    def shutdown(self) -> None:
        import ray
        from ray import serve

        if self.client is not None:
            self.client.close()
        if ray.is_initialized():
            try:
                call_with_timeout(serve.shutdown, 120, "serve.shutdown")
            except Exception as error:
                log(f"serve.shutdown failed: {error}")
            finally:
                ray.shutdown()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- one request per path -----------------------------------------------------------------
    def run_local(self, image: np.ndarray, params: dict[str, Any], batch_faces: bool = True) -> dict[str, Any]:
        import torch

        from facedetailer.params import FaceDetailerParams

        resolved = FaceDetailerParams(**params)
        # ultralytics' select_device("cpu") calls torch.set_num_threads(cpu_count - 1) for the whole
        # process when the detector first runs: restore the replicas' thread count before every call.
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        result = self.local.detail([image], resolved, batch_faces=batch_faces)
        wall = time.perf_counter() - start
        self.thread_drift |= torch.get_num_threads() != self.threads
        return {"wall": wall, "timings": dict(result.timings), "faces": len(result.per_image[0].cropped_refined)}

    def run_handle(self, image: np.ndarray, params: dict[str, Any], batch_faces: bool = True) -> dict[str, Any]:
        start = time.perf_counter()
        result = self.handle.detail.remote(image, params, batch_faces=batch_faces).result(
            timeout_s=self.opts.request_timeout_s
        )
        wall = time.perf_counter() - start
        return {"wall": wall, "timings": dict(result.timings), "faces": len(result.per_image[0].cropped_refined)}

    def run_http(self, png: bytes, params: dict[str, Any], fmt: str = "json") -> dict[str, Any]:
        files = {"image": ("image.png", png, "image/png")}
        data = {"params": json.dumps(params)}
        path = "/v1/detail?format=json" if fmt == "json" else "/v1/detail"
        start = time.perf_counter()
        response = self.client.post(path, files=files, data=data)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        if fmt == "json":
            body = response.json()
            timings, faces = body["timings"], int(body["faces_refined"])
        else:
            _ = response.content
            timings = {
                item.split(";dur=")[0].strip(): float(item.split(";dur=")[1]) / 1000
                for item in response.headers.get("server-timing", "").split(",")
                if ";dur=" in item
            }
            faces = int(response.headers.get("x-faces-refined", "0"))
        wall = time.perf_counter() - start
        return {"wall": wall, "timings": timings, "faces": faces}

    # -- warm-up ----------------------------------------------------------------------------------
    def warm_up(self, images: dict[int, np.ndarray], pngs: dict[int, bytes]) -> None:
        started = time.perf_counter()
        for params in (self.params, self.sam_params):
            self.run_local(images[1], params)
            self.run_http(pngs[1], params)
        self.run_local(images[8], self.params)
        self.run_handle(images[8], self.params)
        self.run_handle(images[1], self.params)
        self.run_http(pngs[1], self.params, fmt="png")
        self.results["warm_up_s"] = round(time.perf_counter() - started, 2)

    # -- (a) + (d) ---------------------------------------------------------------------------------
    def bench_paths(self, name: str, image: np.ndarray, png: bytes, params: dict[str, Any], expected: int,
                    reps: int, paths: Sequence[str]) -> dict[str, Any]:
        """Interleaved repetitions of one request through each path; wall and stage timings."""
        runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
        calls = {
            "in_process": lambda: self.run_local(image, params),
            "handle": lambda: self.run_handle(image, params),
            "http_png": lambda: self.run_http(png, params, fmt="png"),
            "http_json": lambda: self.run_http(png, params, fmt="json"),
        }
        cores: dict[str, list[float]] = {path: [] for path in paths}
        for rep in range(reps):
            for path in paths:
                with CpuMeter() as meter:
                    run = calls[path]()
                assert run["faces"] == expected, f"{name}/{path}: {run['faces']} faces refined, expected {expected}"
                # the inpainter's own time for its (last, here only) model call, inside the replica
                run["timings"]["inpaint_model"] = self.last_inpainter_call(path)["seconds"]
                runs[path].append(run)
                cores[path].append(meter.cores)
            log(f"  {name} rep {rep + 1}/{reps}: " + ", ".join(f"{p} {runs[p][-1]['wall']:.2f}s" for p in paths))
        out: dict[str, Any] = {"image_shape": list(image.shape), "faces": expected, "params": params, "paths": {}}
        for path in paths:
            stages = sorted({stage for run in runs[path] for stage in run["timings"]})
            out["paths"][path] = {
                "wall": summarize([run["wall"] for run in runs[path]]),
                "stages": {s: summarize([run["timings"].get(s, 0.0) for run in runs[path]]) for s in stages},
                "busy_cores": round(statistics.median(cores[path]), 2),
            }
        return out

    # -- (b) ---------------------------------------------------------------------------------------
    def bench_faces(self, images: dict[int, np.ndarray], reps: int, path: str = "handle") -> dict[str, Any]:
        runs: dict[str, dict[int, list[dict[str, Any]]]] = {
            mode: {n: [] for n in FACE_COUNTS} for mode in ("batched", "one_by_one")
        }
        call = self.run_handle if path == "handle" else self.run_local
        for rep in range(reps):
            for n in FACE_COUNTS:
                for mode in ("batched", "one_by_one"):
                    run = call(images[n], self.params, batch_faces=mode == "batched")
                    assert run["faces"] == n, f"{n} faces {mode}: {run['faces']} refined"
                    if mode == "batched":
                        run["unet_batches"] = self.last_inpainter_call(path).get("batches")
                    runs[mode][n].append(run)
            log(f"  {path} faces rep {rep + 1}/{reps}: " + ", ".join(
                f"{n}: {runs['batched'][n][-1]['wall']:.1f}/{runs['one_by_one'][n][-1]['wall']:.1f}s"
                for n in FACE_COUNTS))
        out: dict[str, Any] = {"path": path, "params": self.params, "modes": {}}
        for mode, by_n in runs.items():
            out["modes"][mode] = {
                str(n): {
                    "wall": summarize([r["wall"] for r in items]),
                    "inpaint": summarize([r["timings"].get("inpaint", 0.0) for r in items]),
                    "unet_batches": sorted({r.get("unet_batches") for r in items if r.get("unet_batches")}),
                }
                for n, items in by_n.items()
            }
        return out

    def bench_inpainter_batch(self, image: np.ndarray, reps: int) -> dict[str, Any]:
        """In-process, the inpainter alone: k real face crops in one call, k = 1, 2, 4, 8."""
        from deployments.inpainter import RefineJob
        from facedetailer.params import FaceDetailerParams
        from facedetailer.segs import detections_to_segs
        from facedetailer.wildcards import FacePrompt
        from serve_app.ingress import sampling_settings
        from serve_app.pipeline import RefinePlan, plan_face

        params = FaceDetailerParams(**self.params)
        detections = self.local.detector.detect(image, params.bbox_threshold)
        segs = detections_to_segs(
            image, detections, dilation=params.bbox_dilation, crop_factor=params.bbox_crop_factor,
            drop_size=params.drop_size,
        )
        prompt = FacePrompt(skip=False, stop=False, seed=None, text=None, concat=False)
        plan = plan_face(image, segs.segs[0], 0, prompt, params, 0, RefineJob)
        assert isinstance(plan, RefinePlan), "the face was skipped"
        job = plan.job
        settings = sampling_settings(params)
        out: dict[str, Any] = {"crop_size": list(job.image.shape[:2]), "batches": {}}
        import torch

        torch.set_num_threads(self.threads)
        for k in FACE_COUNTS:
            samples = []
            for _ in range(reps):
                jobs = [RefineJob(**{**job.__dict__, "seed": seed}) for seed in range(k)]
                start = time.perf_counter()
                self.local.inpainter.refine(jobs, settings)
                samples.append(time.perf_counter() - start)
            stat = summarize(samples)
            out["batches"][str(k)] = {"call": stat, "per_crop": stat["median"] / k}
            log(f"  inpainter batch {k}: {stat['median']:.2f}s ({stat['median'] / k:.2f}s per crop)")
        return out

    # -- (c) ---------------------------------------------------------------------------------------
    def bench_clients(self, png: bytes, faces_per_request: int, clients: int, requests: int) -> dict[str, Any]:
        """``requests`` HTTP requests from ``clients`` threads; faces/s over the whole wall time."""
        latencies: list[float] = []
        inpaint: list[float] = []
        errors: list[str] = []
        faces = 0
        lock = threading.Lock()

        def one() -> None:
            nonlocal faces
            try:
                run = self.run_http(png, self.params, fmt="json")
            except Exception as error:
                with lock:
                    errors.append(f"{type(error).__name__}: {error}"[:200])
                return
            with lock:
                latencies.append(run["wall"])
                inpaint.append(run["timings"].get("inpaint", 0.0))
                faces += run["faces"]

        with CpuMeter() as meter, ThreadPoolExecutor(max_workers=clients) as pool:
            start = time.perf_counter()
            futures = [pool.submit(one) for _ in range(requests)]
            done, not_done = wait_futures(futures, timeout=self.opts.level_timeout_s)
            wall = time.perf_counter() - start
            for future in not_done:
                future.cancel()
        if not_done:
            raise TimeoutError(f"{len(not_done)} of {requests} requests still running after {wall:.0f} s")
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
        assert faces == requests * faces_per_request
        return {
            "clients": clients,
            "requests": requests,
            "faces": faces,
            "wall_s": round(wall, 3),
            "faces_per_s": faces / wall,
            "latency": summarize(latencies),
            "inpaint_in_request": summarize(inpaint),
            "busy_cores": round(meter.cores, 2),
        }

    def apply_variant(self, variant: dict[str, Any]) -> dict[str, Any]:
        """Redeploy the app with other inpainter settings (``serve.run`` updates it in place)."""
        from ray import serve

        from serve_app.app import build_app

        args = self.app_args()
        deployment = args.inpainter.deployment
        if "user_config" in variant:
            deployment.user_config = dict(variant["user_config"])
        if "num_replicas" in variant:
            deployment.num_replicas = variant["num_replicas"]
        if "threads" in variant:
            env = {**self.env_vars, "OMP_NUM_THREADS": str(variant["threads"])}
            deployment.ray_actor_options.runtime_env = {"env_vars": env}
        started = time.perf_counter()
        self.handle = call_with_timeout(
            lambda: serve.run(build_app(args), name=APP_NAME, route_prefix="/"), self.opts.deploy_timeout_s,
            "serve.run (variant)",
        )
        return {"redeploy_s": round(time.perf_counter() - started, 2), "batching": self.inpainter_batching()}


# --------------------------------------------------------------------------------------- analysis


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    verdict: dict[str, Any] = {}
    a = results["a"]["one_face"]["paths"]
    base = a["in_process"]["wall"]["median"]
    verdict["a"] = {
        "http_json_over_in_process": ratio(a["http_json"]["wall"]["median"], base),
        "http_png_over_in_process": ratio(a["http_png"]["wall"]["median"], base),
        "handle_over_in_process": ratio(a["handle"]["wall"]["median"], base),
    }
    verdict["a"]["met"] = verdict["a"]["http_json_over_in_process"] <= TARGETS["a"]
    b = results["b"]["modes"]
    one = b["batched"]["1"]["wall"]["median"]
    verdict["b"] = {
        mode: {n: ratio(b[mode][n]["wall"]["median"], one) for n in b[mode]} for mode in b
    }
    verdict["b"]["batched_8_over_8x1"] = ratio(b["batched"]["8"]["wall"]["median"], 8 * one)
    if "b_in_process" in results:
        bl = results["b_in_process"]["modes"]
        one_local = bl["batched"]["1"]["wall"]["median"]
        verdict["b"]["in_process_batched_8"] = ratio(bl["batched"]["8"]["wall"]["median"], one_local)
        verdict["b"]["in_process_one_by_one_8"] = ratio(bl["one_by_one"]["8"]["wall"]["median"], one_local)
    verdict["b"]["met"] = verdict["b"]["batched_8_over_8x1"] <= TARGETS["b"]
    c = results["c"]["levels"]
    seq = c["1"]["faces_per_s"]
    verdict["c"] = {n: ratio(level["faces_per_s"], seq) for n, level in c.items()}
    tuned = {name: ratio(v["level"]["faces_per_s"], seq) for name, v in results["c"].get("variants", {}).items()
             if "level" in v}
    verdict["c"]["variants"] = tuned
    best = max([verdict["c"][str(max(int(k) for k in c))]] + list(tuned.values()))
    verdict["c"]["best_8_clients"] = best
    verdict["c"]["met"] = best >= TARGETS["c"]
    return verdict


# ----------------------------------------------------------------------------------------- report


def stage_row(name: str, local: dict[str, Any], served: dict[str, Any], stage: str, diff_column: bool = True) -> str:
    lval = local["stages"].get(stage)
    sval = served["stages"].get(stage)
    diff = (sval["median"] if sval else 0.0) - (lval["median"] if lval else 0.0)
    show_diff = diff_column and (lval is not None or sval is not None)
    return f"| {name} | {fmt_s(lval, 3)} | {fmt_s(sval, 3)} | {f'{diff * 1000:+.0f} ms' if show_diff else '—'} |"


def breakdown_table(block: dict[str, Any]) -> list[str]:
    local, served = block["paths"]["in_process"], block["paths"]["http_json"]
    lines = [
        "| stage | in-process | served over HTTP (`timings`) | served − in-process |",
        "|---|---|---|---|",
        stage_row("decode (multipart + image decode)", local, served, "decode"),
        stage_row("detect", local, served, "detect"),
    ]
    if "sam" in served["stages"]:
        lines.append(stage_row("SAM", local, served, "sam"))
    lines += [
        stage_row("inpaint", local, served, "inpaint"),
        stage_row("… of which the inpainter's model call", local, served, "inpaint_model"),
        stage_row("blend (masks, paste)", local, served, "blend"),
        stage_row("pipeline (the whole cycle)", local, served, "pipeline"),
        stage_row("encode (JSON, base64 PNGs)", local, served, "encode"),
        stage_row("ingress total (decode → encode)", local, served, "total", diff_column=False),
    ]
    lw, sw = local["wall"], served["wall"]
    lines.append(
        f"| **client wall time** | {fmt_s(lw, 3)} | {fmt_s(sw, 3)} | "
        f"{(sw['median'] - lw['median']) * 1000:+.0f} ms |"
    )
    return lines


def hops(block: dict[str, Any]) -> dict[str, float]:
    """Where the served request's extra time goes (medians, seconds)."""
    local, served = block["paths"]["in_process"], block["paths"]["http_json"]

    def med(path: dict[str, Any], stage: str) -> float:
        return path["stages"][stage]["median"] if stage in path["stages"] else 0.0

    out = {f"{stage}_hop": med(served, stage) - med(local, stage) for stage in ("detect", "sam", "inpaint")}
    out["inpaint_hop_in_replica"] = med(served, "inpaint") - med(served, "inpaint_model")
    out["inpaint_model_served"] = med(served, "inpaint_model")
    out["inpaint_model_in_process"] = med(local, "inpaint_model")
    out["pipeline_hops"] = med(served, "pipeline") - med(local, "pipeline")
    out["ingress_decode_encode"] = med(served, "decode") + med(served, "encode")
    out["ingress_other"] = med(served, "total") - med(served, "pipeline") - out["ingress_decode_encode"]
    out["proxy_and_http"] = served["wall"]["median"] - med(served, "total")
    out["total_extra"] = served["wall"]["median"] - local["wall"]["median"]
    return out


def ms(value: float) -> str:
    return f"{value * 1000:+.0f} ms"


def _single_crop_share(level: dict[str, Any]) -> float | None:
    calls = level.get("batching", {}).get("recent_model_calls")
    if not calls:
        return None
    return sum(1 for size in calls if size == 1) / len(calls)


def narrative(results: dict[str, Any], verdict: dict[str, Any]) -> list[str]:
    """The explanation under the summary, from the numbers of this run."""
    va, vb, vc = verdict["a"], verdict["b"], verdict["c"]
    one = results["a"]["one_face"]
    h = hops(one)
    local_one = one["paths"]["in_process"]
    wall = local_one["wall"]["median"]
    micro = results["b_micro"]["batches"]
    per_crop_8 = ratio(micro["8"]["per_crop"], micro["1"]["per_crop"])
    levels = results["c"]["levels"]
    top = str(max(int(k) for k in levels))
    seq = levels["1"]
    busy_seq = seq["busy_cores"]
    nproc = results["machine"]["nproc"]
    served_b = results["b"]["modes"]["batched"]
    served_per_crop_8 = served_b["8"]["inpaint"]["median"] / 8
    served_per_crop_1 = served_b["1"]["inpaint"]["median"]
    variants = {k: v for k, v in results["c"].get("variants", {}).items() if "level" in v}
    single_share = _single_crop_share(levels[top])
    crop_h, crop_w = results["b_micro"]["crop_size"]
    added = h["detect_hop"] + h["inpaint_hop_in_replica"] + h["ingress_decode_encode"] + h["proxy_and_http"]
    lines = ["## What the numbers say", ""]

    text = (
        f"**(a) {'Met' if va['met'] else 'Missed'}.** One 1-face request took {wall:.2f} s in-process and "
        f"{va['http_json_over_in_process']:.2f}× that over HTTP (JSON), {va['http_png_over_in_process']:.2f}× "
        f"(PNG), {va['handle_over_in_process']:.2f}× through the handle. What serving adds, per stage (section "
        f"d): the detector hop {ms(h['detect_hop'])}, the inpainter hop {ms(h['inpaint_hop_in_replica'])} (of "
        "which 50 ms is the `@serve.batch` wait that a lone crop always pays), decode + encode in the ingress "
        f"{ms(h['ingress_decode_encode'])}, proxy + HTTP {ms(h['proxy_and_http'])}: {added * 1000:.0f} ms, "
        f"i.e. {1 + added / wall:.2f}× if the model calls took the same time in both processes. They did not "
        f"quite: the inpainter's model call took {h['inpaint_model_in_process']:.2f} s in the benchmark process "
        f"and {h['inpaint_model_served']:.2f} s in its replica (same thread count), a difference of the same "
        "order as the hops. The JSON encode "
        f"({one['paths']['http_json']['stages']['encode']['median'] * 1000:.0f} ms) PNG-encodes the full image and "
        "the full mask twice each (`image` and `images[0]`, `mask` and `masks[0]`); the PNG format, one encode, "
        "is cheaper. The SAM row adds a second model hop, zidane.jpg a 1280×720 image and two faces."
    )
    lines += [text, ""]

    text = (
        f"**(b) {'Met' if vb['met'] else 'Missed'}.** 8 faces in one inpainter call took "
        f"{vb['batched']['8']:.1f}× one face served ({vb.get('in_process_batched_8', float('nan')):.1f}× "
        f"in-process); one by one {vb['one_by_one']['8']:.1f}×. Batching does not make a face cheaper on this "
        f"CPU: in the inpainter alone, a crop in a batch of 8 costs {per_crop_8:.2f}× a crop alone. A single "
        f"1-face request already keeps {local_one['busy_cores']} of the {nproc} cores busy (the UNet's "
        "convolutions and attention run on both OpenMP threads), so there is no idle hardware for a batch to "
        "fill, and the per-image costs that more faces per image amortise (detection ≈ "
        f"{local_one['stages']['detect']['median'] * 1000:.0f} ms, one inpainter call's overhead, decode and "
        f"encode) are a few % of the {wall:.1f} s a face costs. The 0.6 target presumes hardware that runs a "
        "batch of 8 in much less than 8× the time of one."
    )
    if served_per_crop_8 > 1.15 * served_per_crop_1:
        local_8 = vb.get("in_process_batched_8", float("nan"))
        text += (
            f" In the served replica a crop of an 8-crop batch took {served_per_crop_8:.2f} s against "
            f"{served_per_crop_1:.2f} s alone; in-process the 8-face image took {local_8:.1f}× one face."
        )
    lines += [text, ""]

    text = (
        f"**(c) {'Met' if vc['met'] else 'Missed'}.** The shipped config served {seq['faces_per_s']:.2f} "
        f"faces/s sequentially, {vc['4']:.2f}× that with 4 clients and {vc[top]:.2f}× with {top}. Sequential "
        f"requests already keep {busy_seq} of the {nproc} cores busy, so overlapping requests can only use the "
        f"last {max(nproc - busy_seq, 0):.2f} core (about {nproc / busy_seq:.2f}×), and batching saves nothing "
        f"per crop on this CPU ({per_crop_8:.2f}× per crop at batch 8). Anything beyond has to come from "
        "cheaper work per face (fewer threads per model call, below); 2.5× is out of reach on 2 cores. "
        "Concurrent requests mostly queue: the median latency grows from "
        f"{seq['latency']['median']:.1f} s to {levels[top]['latency']['median']:.1f} s with {top} clients."
    )
    lines += [text, ""]
    if single_share is not None:
        text = (
            f"Cross-request batching mostly did not happen: {single_share * 100:.0f} % of the inpainter's model "
            f"calls with {top} clients carried a single crop (last column of the (c) table), although up to "
            f"{top} crops were waiting. Ray {results['machine']['ray']}'s `@serve.batch` closes a batch "
            "`batch_wait_timeout_s` after its first item even while the previous batch is still running "
            "(`_BatchQueue._process_batches` forms the next batch before it waits for the "
            "`max_concurrent_batches` slot), so a batch holds only the crops that arrived within the same "
            "0.05 s; under steady load they arrive one at a time."
        )
        wait = next((v for k, v in variants.items() if "wait" in k and "longer" in k), None)
        if wait is not None:
            name = next(k for k, v in variants.items() if v is wait)
            text += (
                f" With a 0.25-s wait the batches were {_calls(wait['level']['batching'].get('recent_model_calls'))} "
                f"(size×count) and throughput {vc['variants'][name]:.2f}×, at "
                f"{wait['sequential']['latency']['median']:.2f} s instead of {seq['latency']['median']:.2f} s for "
                "a lone request: full batches save the per-call overhead but no per-crop compute here."
            )
        text += (
            " On a GPU this is the mechanism that matters, so the batch should be formed when the model becomes "
            "free (drain the queue at that moment), or concurrent requests will mostly run at batch 1 there too."
        )
        lines += [text, ""]
    threads = next((k for k, v in variants.items() if "threads" in v["config"]), None)
    if threads is not None and vc["variants"][threads] > vc[top]:
        alone = variants[threads]["sequential"]["latency"]["median"]
        gain = vc["variants"][threads] / vc[top] - 1
        text = (
            f"What helped most is fewer threads per model call: two inpainter replicas with one OpenMP thread "
            f"each reached {vc['variants'][threads]:.2f}× ({gain * 100:.0f} % more faces/s than the shipped "
            f"config under the same load). Two single-threaded UNets in parallel lose less than one UNet split over "
            "two threads (a synchronisation at every operator, and a 2-thread OpenMP team stalls whenever another "
            f"process takes one of the two cores). The price is latency: a lone request takes {alone:.1f} s "
            f"instead of {seq['latency']['median']:.1f} s, since it runs on one core."
        )
        lines += [text, ""]

    text = (
        "**What changes on a GPU.** The inpainter's work moves to the GPU and the CPU keeps decode, detection "
        "pre/post-processing, blending and encode, so the stages of concurrent requests overlap instead of "
        f"competing for the same two cores. A batch-1 SD 1.5 UNet on a {crop_w}×{crop_h} crop "
        f"({crop_w // 8}×{crop_h // 8} latents) leaves most of a GPU idle, so a batch of 8 crops costs a few "
        "times one crop, not 8×: (b) would land well under 0.6 × 8 and (c) would scale with the batch size, "
        "provided the batches are filled (the `@serve.batch` issue above) and the inpainter's `max_batch_size` "
        "and `max_ongoing_requests` allow it; fp16 and the fractional GPUs of `configs/gpu.yaml` add to that. "
        "These are expectations from how GPUs behave, not measurements: this machine has no GPU."
    )
    lines += [text]
    return lines


KEPT_SECTION = "## Continuous batching"  # written by benchmarks/continuous_batching.py


def _measured_serve_batch(results: dict[str, Any]) -> bool:
    """Whether the run measured the inpainter's old ``@serve.batch`` path (it reports a batch wait)."""
    levels = results.get("c", {}).get("levels", {})
    return any(level.get("batching", {}).get("batch_wait_timeout_s") is not None for level in levels.values())


def render(results: dict[str, Any], verdict: dict[str, Any], command: str) -> str:
    m = results["machine"]
    p = results["params"]
    lines: list[str] = []
    add = lines.append
    add("# Benchmarks: served graph vs in-process, faces per image, concurrent clients")
    add("")
    add(f"All numbers below come from **one run** of `benchmarks/run_benchmarks.py` ({results['finished_at']}, "
        f"{results['duration_s'] / 60:.1f} min). Raw samples: [`benchmarks/results.json`](../benchmarks/results.json). "
        "Times are medians, with the spread (min–max) over the repetitions in parentheses.")
    add("")
    if _measured_serve_batch(results):
        add(f"**Measured before the inpainter engine** (commit `{m.get('git_commit')}`): the inpainter then "
            "batched with Ray's `@serve.batch` (`batch_wait_timeout_s` 0.05 s). Issue 9 replaced it with a "
            "step-level engine that has no batch wait and lets crops of concurrent requests share UNet calls "
            "whatever their settings, so what this page says about the 50-ms wait a lone crop pays and about "
            "batches of one crop under load no longer holds: see [Continuous batching](#continuous-batching) for "
            "the current figures, next to the `@serve.batch` path. The rest (the cost of a face on 2 cores, the "
            "hops, encode and decode) still describes the service; the inpainter's model call itself now runs "
            "ComfyUI's samplers.")
        add("")
    add("## Summary")
    add("")
    add("| target (issue 5) | measured | |")
    add("|---|---|---|")
    va, vb, vc = verdict["a"], verdict["b"], verdict["c"]
    add(f"| (a) served over HTTP ≤ {TARGETS['a']}× in-process, one request | "
        f"{va['http_json_over_in_process']:.3f}× (JSON), {va['http_png_over_in_process']:.3f}× (PNG), "
        f"{va['handle_over_in_process']:.3f}× (Python handle) | {'**met**' if va['met'] else '**missed**'} |")
    add(f"| (b) 8 faces batched ≤ {TARGETS['b']} × 8 × (1 face) | {vb['batched_8_over_8x1']:.2f} × 8 × (1 face) "
        f"({vb['batched']['8']:.2f}× the 1-face time; one by one {vb['one_by_one']['8']:.2f}×) | "
        f"{'**met**' if vb['met'] else '**missed**'} |")
    levels = results["c"]["levels"]
    top = str(max(int(k) for k in levels))
    add(f"| (c) 8 clients ≥ {TARGETS['c']}× sequential faces/s | {vc[top]:.2f}× with the shipped config; "
        f"best variant {vc['best_8_clients']:.2f}× | {'**met**' if vc['met'] else '**missed**'} |")
    add("")
    lines.extend(narrative(results, verdict))
    add("")
    add("## Machine and set-up")
    add("")
    add(f"- CPU: {m['cpu_model']}, `nproc` = {m['nproc_cmd'] or m['nproc']}, no GPU; RAM {m['ram_gib']} GiB; "
        f"Linux {m['kernel']}, Python {m['python']}")
    add(f"- torch {m['torch']}, ray {m['ray']}, diffusers {m['diffusers']}, ultralytics {m['ultralytics']}, "
        f"onnxruntime {m['onnxruntime']}")
    own = ("benchmarks/", "docs/benchmarks.md")
    dirty = [d for d in m["git_uncommitted"] if not d.startswith(own)]
    add(f"- code: commit `{m['git_commit']}`" + (
        f" plus uncommitted changes in {', '.join(f'`{d}`' for d in dirty)}" if dirty
        else " (working tree clean apart from this benchmark's own files)"))
    add(f"- busy cores just before the run: {results['idle_wait']['busy_cores_at_start']} of 2 (after waiting "
        f"{results['idle_wait']['waited_s']:.0f} s for an idle machine); load average at start / end: "
        f"{results['load']['start']} / {results['load']['end']}; a pytest session was running in "
        f"{results['foreign_load']['with_pytest_running']} of {results['foreign_load']['samples']} 2-s samples "
        "during the run. With 2 cores any other process skews the numbers")
    omp = results.get("replica_env", {}).get("OMP_NUM_THREADS", "?")
    add("- served: `configs/local-cpu.yaml` unchanged (face YOLO `pkg://faceghost/model/v0-1.onnx` on ONNX Runtime, "
        "LiteMedSAM, tiny random-weight SD 1.5 inpainter `tiny://sd/pipeline`, float32; one replica each; "
        f"`OMP_NUM_THREADS={omp}` in every replica; inpainter `max_batch_size` 8 crops, `batch_wait_timeout_s` 0.05 s) "
        "on a fresh local Ray instance (`ray.init(address=\"local\", num_cpus=2)`) and a free localhost port, "
        "started with `serve_app.cli.start_serving`; clients on the same machine")
    add(f"- in-process: the same model classes and references (`FaceDetector`, `SamSegmenter`, `Inpainter`) "
        f"driven by `serve_app.local.LocalStages` in the benchmark process, `torch.set_num_threads("
        f"{results['in_process_torch_threads']})` to match the replicas' `OMP_NUM_THREADS` (fair comparison; "
        "set again before every call, because ultralytics' `select_device` resets it process-wide); "
        "the served replicas sit idle while it runs, and vice versa")
    steps_note = "the node's default" if p["steps"] == 20 else "a smoke run, not the node's 20"
    add(f"- FaceDetailer parameters: node defaults except `steps` = **{p['steps']}** ({steps_note}), "
        f"`guide_size` = **{p['guide_size']}**, `max_size` = **{p['max_size']}** (with the node's 384/1024 these "
        "faces would be sampled at up to 1024 px on the long side, 4× the pixels, too slow for this run), "
        "`seed` 0: `denoise` 0.5, `cfg` 8, euler/normal, "
        "`bbox_crop_factor` 3, `feather` 5, `noise_mask` on with `noise_mask_feather` 20. The SAM rows add "
        "`use_sam` with `sam_detection_hint: none` (LiteMedSAM is box-prompted)")
    sizes = sorted({tuple(size) for entry in results["face_crops"].values() for size in entry["sampled_sizes"]})
    add(f"- images: a {GRID[0]}×{GRID[1]} canvas of {TILE}-px tiles ({GRID[0] * TILE}×{GRID[1] * TILE}), 1, 2, 4 or "
        "8 tiles showing skimage's astronaut and the others skimage's coffee photo, so every image has the same "
        "size and the detector sees each face at the same scale. The script asserts the detector's count and "
        "that no two crop regions overlap (every face of an image can share one inpainter call). Faces are "
        f"sampled at {' or '.join(f'{w}×{h}' for w, h in sizes)} px (a 1-px difference in the detected box "
        "changes the width). Plus ultralytics' `zidane.jpg` (1280×720, 2 faces) as a real photo")
    add(f"- warm-up before measuring: {results['warm_up_s']:.0f} s; start-up of Ray + the app: "
        f"{results['serve_startup_s']:.0f} s; in-process model load {results['in_process_load_s']:.1f} s")
    add("")
    add("## (a) Served graph vs in-process, one request")
    add("")
    add("One request, repetitions interleaved across paths. *in-process*: `LocalStages.detail` (numpy in, "
        "`DetailResult` out). *handle*: `handle.detail.remote(image, params)` (Ray hops, no HTTP). "
        "*HTTP PNG*: `POST /v1/detail` with a PNG upload, PNG back. *HTTP JSON*: `POST /v1/detail?format=json`, "
        "every output as base64 PNGs plus `timings` (the path the breakdown below uses). Busy cores: the machine's "
        "average number of busy cores during the request (out of 2).")
    add("")
    add("| image | path | wall time | × in-process | busy cores |")
    add("|---|---|---|---|---|")
    for key, label in (("one_face", "1 face (512×1024)"), ("one_face_sam", "1 face, SAM"),
                       ("zidane", "zidane.jpg, 2 faces")):
        if key not in results["a"]:
            continue
        block = results["a"][key]["paths"]
        base = block["in_process"]["wall"]["median"]
        for path, name in (("in_process", "in-process"), ("handle", "handle"), ("http_png", "HTTP PNG"),
                           ("http_json", "HTTP JSON")):
            if path in block:
                add(f"| {label} | {name} | {fmt_s(block[path]['wall'], 3)} | "
                    f"{ratio(block[path]['wall']['median'], base):.3f}× | {block[path]['busy_cores']} |")
    add("")
    add("## (b) Faces per image: batched vs one by one")
    add("")
    add("*batched* (`batch_faces=True`, the default): all faces of the image in one inpainter call. *one by one* "
        "(`batch_faces=False`): one inpainter call per face, the reference's way. *served*: through the Python "
        "handle (the served graph without HTTP; the target is checked on these); *in-process*: `LocalStages`. "
        "× 1 face: relative to the same path's 1-face batched median. The inpaint stage is 95–99 % of every "
        "time here.")
    add("")
    add("| faces | served batched | × 1 face | served one by one | × 1 face | in-process batched | × 1 face | "
        "in-process one by one | × 1 face |")
    add("|---|---|---|---|---|---|---|---|---|")
    b = results["b"]["modes"]
    bl = results.get("b_in_process", {}).get("modes")
    for n in FACE_COUNTS:
        key = str(n)
        cells = [str(n)]
        for modes in (b, bl):
            for mode in ("batched", "one_by_one"):
                if not modes:
                    cells += ["—", "—"]
                    continue
                stat = modes[mode][key]["wall"]
                cells += [fmt_s(stat), f"{ratio(stat['median'], modes['batched']['1']['wall']['median']):.2f}×"]
        add("| " + " | ".join(cells) + " |")
    add("")
    batches = ", ".join(
        f"{n} faces: {'/'.join(str(v) for v in b['batched'][str(n)].get('unet_batches', [])) or '?'}"
        for n in FACE_COUNTS
    )
    add(f"UNet batches inside the batched inpainter call (the inpainter groups crops by padded latent size): "
        f"{batches}.")
    add("")
    add(f"Target: 8 faces batched ≤ 0.6 × 8 × (1 face) = {0.6 * 8:.1f}× the 1-face time; measured "
        f"{vb['batched']['8']:.2f}× served (= {vb['batched_8_over_8x1']:.2f} × 8 × 1 face)"
        + (f", {vb['in_process_batched_8']:.2f}× in-process" if "in_process_batched_8" in vb else "") + ".")
    add("")
    micro = results["b_micro"]
    add(f"The inpainter alone, in-process ({micro['crop_size'][1]}×{micro['crop_size'][0]} crops, "
        f"{p['steps']} steps, k crops in one `Inpainter.refine` call):")
    add("")
    add("| crops per call | call | per crop | per crop vs 1 crop |")
    add("|---|---|---|---|")
    one_crop = micro["batches"]["1"]["per_crop"]
    for k, entry in micro["batches"].items():
        add(f"| {k} | {fmt_s(entry['call'])} | {entry['per_crop']:.2f} s | {ratio(entry['per_crop'], one_crop):.2f} |")
    add("")
    add("## (c) Concurrent clients")
    add("")
    c = results["c"]
    add(f"{c['requests']} HTTP JSON requests per level of the 1-face image, from N client threads (httpx) on "
        "localhost; throughput = faces refined / wall time of the level.")
    add("")
    add("| clients | wall | faces/s | × sequential | latency per request | inpaint inside a request | "
        "busy cores | crops per inpainter call |")
    add("|---|---|---|---|---|---|---|---|")
    for n, level in c["levels"].items():
        calls = level.get("batching", {}).get("recent_model_calls")
        add(f"| {n} | {level['wall_s']:.1f} s | {level['faces_per_s']:.3f} | {vc[n]:.2f}× | "
            f"{fmt_s(level['latency'])} | {fmt_s(level['inpaint_in_request'])} | {level['busy_cores']} | "
            f"{_calls(calls)} |")
    add("")
    if c.get("variants"):
        add(f"Inpainter batching variants ({top} clients, the same requests), each redeployed with `serve.run` "
            "and a different inpainter configuration; ratios are to the shipped config's sequential throughput:")
        add("")
        add("| variant | wall | faces/s | × sequential | latency per request | busy cores | "
            "crops per inpainter call | latency of a lone request |")
        add("|---|---|---|---|---|---|---|---|")
        for name, variant in c["variants"].items():
            if "level" not in variant:
                add(f"| {name} | skipped: {variant.get('skipped', '')} | | | | | | |")
                continue
            level = variant["level"]
            add(f"| {name} | {level['wall_s']:.1f} s | {level['faces_per_s']:.3f} | {vc['variants'][name]:.2f}× | "
                f"{fmt_s(level['latency'])} | {level['busy_cores']} | "
                f"{_calls(level.get('batching', {}).get('recent_model_calls'))} | "
                f"{fmt_s(variant.get('sequential', {}).get('latency'))} |")
        add("")
    add("## (d) Per-stage breakdown and hops")
    add("")
    add("Stage times from the JSON `timings` of the served requests in (a) next to the same stages timed by the "
        "same pipeline code in-process. In the served graph *detect*, *SAM* and *inpaint* are awaited deployment "
        "calls, so their served time includes the **hop**: the handle call, pickling the image or crops through "
        "Ray's object store, the replica's queue, `asyncio.to_thread` in the replica, and for the inpainter the "
        "`@serve.batch` wait for more crops. *decode* and *encode* exist only in the served path (multipart "
        "parsing + image decode, and base64 PNGs of every output). Hops = served stage − in-process stage.")
    add("")
    for key, label in (("one_face", "1 face, no SAM"), ("one_face_sam", "1 face with SAM")):
        if key not in results["a"]:
            continue
        add(f"**{label}** ({results['a'][key]['paths']['http_json']['wall']['n']} repetitions each):")
        add("")
        lines.extend(breakdown_table(results["a"][key]))
        add("")
        h = hops(results["a"][key])
        parts = [f"detect hop {ms(h['detect_hop'])}"]
        if "sam" in results["a"][key]["paths"]["http_json"]["stages"]:
            parts.append(f"SAM hop {ms(h['sam_hop'])}")
        parts += [
            f"inpaint hop {ms(h['inpaint_hop_in_replica'])} (served inpaint stage − the model call timed inside "
            "the replica; it includes the 0.05-s `@serve.batch` wait a lone crop always pays), while the model "
            f"call itself took {ms(h['inpaint_model_served'] - h['inpaint_model_in_process'])} vs in-process",
            f"ingress decode + encode {ms(h['ingress_decode_encode'])}",
            f"other ingress work (validation, routing) {ms(h['ingress_other'])}",
            f"proxy + HTTP + client parsing {ms(h['proxy_and_http'])}",
        ]
        add(f"Where the extra {h['total_extra'] * 1000:.0f} ms go: " + "; ".join(parts) + ".")
        add("")
    add("## Reproduce")
    add("")
    add("```sh")
    add("make venv                                   # once: .venv with the project and its test assets")
    add(".venv/bin/python -m deployments.testing.build_tiny_models .cache/tests/tiny-models   # once, if missing")
    add(command)
    add("# only re-render this page from the saved numbers")
    add(".venv/bin/python benchmarks/run_benchmarks.py --render-from benchmarks/results.json --out docs/benchmarks.md")
    add("```")
    add("")
    add("The script starts its own local Ray instance (it never joins a running one), serves "
        "`configs/local-cpu.yaml` on a free localhost port, and shuts Serve and Ray down at the end, also on "
        "errors. Run it on an otherwise idle machine: with 2 cores, anything else running (a test session) "
        "shows up directly in the numbers. `--quick` is a smoke run (2 steps, 1 repetition) for checking the "
        "script, not for numbers.")
    add("")
    return "\n".join(lines)


def _calls(calls: list[int] | None) -> str:
    if not calls:
        return "—"
    counts: dict[int, int] = {}
    for size in calls:
        counts[size] = counts.get(size, 0) + 1
    return ", ".join(f"{size}×{count}" for size, count in sorted(counts.items(), reverse=True))


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"), help="the Markdown write-up")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results.json"), help="raw numbers")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guide-size", type=float, default=256)
    parser.add_argument("--max-size", type=float, default=512)
    parser.add_argument("--reps", type=int, default=5, help="(a) repetitions for the 1-face request")
    parser.add_argument("--reps-small", type=int, default=3, help="(a) repetitions for SAM and zidane.jpg")
    parser.add_argument("--face-reps", type=int, default=3, help="(b) repetitions per face count and mode")
    parser.add_argument("--face-reps-in-process", type=int, default=2, help="(b) in-process repetitions")
    parser.add_argument("--micro-reps", type=int, default=1, help="(b) inpainter-alone repetitions")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests", type=int, default=16, help="(c) requests per concurrency level")
    parser.add_argument("--no-tuning", action="store_true", help="skip the inpainter batching variants")
    parser.add_argument("--variant-sequential-requests", type=int, default=4,
                        help="(c) sequential requests per variant, for its latency alone")
    parser.add_argument("--budget-s", type=float, default=840, help="skip tuning variants that would end later")
    parser.add_argument("--wait-idle-s", type=float, default=120, help="first wait up to this long for an idle CPU")
    parser.add_argument("--request-timeout-s", type=float, default=600)
    parser.add_argument("--level-timeout-s", type=float, default=600)
    parser.add_argument("--deploy-timeout-s", type=float, default=300)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 repetition, 4 requests")
    parser.add_argument("--render-from", metavar="RESULTS_JSON", help="only re-render --out from saved results")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.steps, opts.reps, opts.reps_small, opts.face_reps, opts.requests = 2, 1, 1, 1, 4
        opts.face_reps_in_process = 1
    return opts


# The inpainter's engine has no batch wait any more (issue 9): its knobs are max_batch_size and
# max_queued_crops; benchmarks/continuous_batching.py measures them.
TUNING_VARIANTS: dict[str, dict[str, Any]] = {
    "no cross-request batching (max_batch_size 1)": {"user_config": {"max_batch_size": 1}},
    "2 inpainter replicas × OMP_NUM_THREADS=1 (8 crops)": {"num_replicas": 2, "threads": 1},
}


def _batching_since(bench: Bench, before: list[int] | None) -> dict[str, Any]:
    """The inpainter's knobs and, if it reports them, the crops per model call since ``before``."""
    calls = bench.inpainter_batching()
    after = calls.pop("recent_model_calls", None)
    if after is not None and before is not None and len(after) < 256:  # the deployment keeps the last 256
        calls["recent_model_calls"] = after[len(before):]
    return calls


def _level(bench: Bench, png: bytes, clients: int, requests: int, stats: bool = True) -> dict[str, Any]:
    before = bench.inpainter_batching().get("recent_model_calls") if stats else None
    level = bench.bench_clients(png, 1, clients, requests)
    level["batching"] = _batching_since(bench, before) if stats else {}
    log(f"  {clients} clients: {level['faces_per_s']:.3f} faces/s in {level['wall_s']:.1f}s")
    return level


def measure(opts: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every measurement of one run; Serve and Ray are shut down at the end, also on errors."""
    from deployments.testing import assets
    from facedetailer.params import FaceDetailerParams

    idle = wait_for_idle(opts.wait_idle_s, 0.3)
    bench = Bench(opts)
    results: dict[str, Any] = {"command": command, "idle_wait": idle, "load": {"start": loadavg()}}
    results["params"] = bench.params
    images = {n: tiled_faces(n) for n in FACE_COUNTS}
    pngs = {n: png_bytes(images[n]) for n in FACE_COUNTS}
    zidane = assets.zidane()
    zidane_png = Path(assets.ultralytics_asset("zidane.jpg")).read_bytes()
    monitor = ForeignLoadMonitor()
    monitor.start()
    try:
        log("loading the models in-process")
        bench.load_in_process()
        results["machine"] = machine_info()
        resolved = FaceDetailerParams(**bench.params)
        results["face_crops"] = {str(n): check_faces(bench.local, images[n], resolved, n) for n in FACE_COUNTS}
        log(f"starting Ray and serving {opts.config}")
        bench.start_serving()
        log(f"serving on {bench.url}; warming up")
        bench.warm_up(images, pngs)
        results.update(bench.results)
        results["replica_env"] = {k: v for k, v in bench.env_vars.items() if k in ("OMP_NUM_THREADS",)}

        log("(a)+(d) one request: in-process vs handle vs HTTP")
        all_paths = ("in_process", "handle", "http_png", "http_json")
        results["a"] = {
            "one_face": bench.bench_paths("1 face", images[1], pngs[1], bench.params, 1, opts.reps, all_paths),
            "one_face_sam": bench.bench_paths(
                "1 face SAM", images[1], pngs[1], bench.sam_params, 1, opts.reps_small, ("in_process", "http_json")
            ),
            "zidane": bench.bench_paths(
                "zidane", zidane, zidane_png, bench.params, 2, opts.reps_small, ("in_process", "http_json")
            ),
        }
        log("(b) faces per image, batched vs one by one (handle)")
        results["b"] = bench.bench_faces(images, opts.face_reps)
        log("(b) faces per image, batched vs one by one (in-process)")
        results["b_in_process"] = bench.bench_faces(images, opts.face_reps_in_process, path="in_process")
        log("(b) the inpainter alone, in-process")
        results["b_micro"] = bench.bench_inpainter_batch(images[1], opts.micro_reps)

        log("(c) concurrent clients")
        clients = [int(v) for v in opts.clients.split(",")]
        levels = {str(n): _level(bench, pngs[1], n, opts.requests) for n in clients}
        results["c"] = {"requests": opts.requests, "image_faces": 1, "levels": levels, "variants": {}}
        top = max(clients)
        for name, variant in ({} if opts.no_tuning else TUNING_VARIANTS).items():
            needed = levels[str(top)]["wall_s"] * 1.8 + 60
            if bench.elapsed() + needed > opts.budget_s:
                results["c"]["variants"][name] = {"config": variant, "skipped": f"time budget {opts.budget_s:.0f} s"}
                log(f"  skipping variant {name}: time budget")
                continue
            log(f"  variant: {name}")
            applied = bench.apply_variant(variant)
            bench.run_http(pngs[1], bench.params)  # the first request on new replicas
            one_replica = variant.get("num_replicas", 1) == 1  # the stats come from one replica
            alone = _level(bench, pngs[1], 1, opts.variant_sequential_requests, stats=one_replica)
            level = _level(bench, pngs[1], top, opts.requests, stats=one_replica)
            results["c"]["variants"][name] = {"config": variant, **applied, "level": level, "sequential": alone}
    finally:
        log("shutting down Serve and Ray")
        bench.shutdown()
        results["foreign_load"] = monitor.stop()
    results["in_process_thread_drift"] = bench.thread_drift
    results["load"]["end"] = loadavg()
    results["duration_s"] = round(bench.elapsed(), 1)
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M %Z")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    os.environ.setdefault("FACEDETAILER_TINY_MODELS", str(DEFAULT_TINY_MODELS))
    config = yaml.safe_load(Path(opts.config).read_text())
    app_env = next(a for a in config["applications"] if a.get("name") == APP_NAME).get("runtime_env", {})
    # Offline switches and the replicas' thread count, before any model library is imported.
    os.environ.update({k: str(v) for k, v in app_env.get("env_vars", {}).items()})
    from deployments.runtime_env import apply_offline_env

    apply_offline_env(Path(os.environ.get("YOLO_CONFIG_DIR", "/tmp/facedetailer-ultralytics")))
    arguments = list(argv if argv is not None else sys.argv[1:])
    if opts.render_from:
        results = json.loads(Path(opts.render_from).read_text())
    else:
        results = measure(opts, " ".join([".venv/bin/python benchmarks/run_benchmarks.py", *arguments]))
    results["verdict"] = analyse(results)
    if not opts.render_from:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    out = Path(opts.out)
    # keep the sections other scripts write into the same page (continuous_batching.py's)
    kept = ""
    if out.exists() and KEPT_SECTION in out.read_text():
        kept = "\n" + KEPT_SECTION + out.read_text().split(KEPT_SECTION, 1)[1].rstrip("\n") + "\n"
    out.write_text(render(results, results["verdict"], results["command"]).rstrip("\n") + "\n" + kept)
    log(f"wrote {opts.out}" + ("" if opts.render_from else f" and {opts.json} in {results['duration_s']:.0f} s"))
    print(json.dumps(results["verdict"], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
