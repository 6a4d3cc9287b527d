#!/usr/bin/env python
"""End to end against Impact Pack's own FaceDetailer: wall time per face and the final image.

``comfy_speed.py`` races the model stages; this runs the whole node on both sides, in one process,
interleaved, on the same weights, image and values:

- **Impact**: ``FaceDetailer().doit(...)`` of an Impact Pack checkout on a ComfyUI checkout — the
  node's own code from detection to the paste — with the Impact Subpack's ``UltraBBoxDetector``
  (what ``UltralyticsDetectorProvider`` gives a graph) on the packaged face YOLO, ComfyUI's model
  and VAE built from the checkpoint's diffusers weights (``comfy.sd.load_diffusion_model_state_dict``,
  ``comfy.sd.VAE``), and the positive/negative CONDITIONING our inpainter encodes for the same
  prompts (ComfyUI encodes them in CLIPTextEncode, a node of its own that runs once and is cached;
  ``family_parity.py`` shows the two encodings agree to 3e-6). Its result image is quantised as
  SaveImage does.
- **Ours**: ``LocalStages.detail`` — the service's FaceDetailer cycle (detector, inpainter engine,
  paste) without Ray and HTTP, as ``precision.py`` runs it.

Both get FaceDetailer's node defaults with ``max_size`` 512 (the issue's parity set-up), taken
from ``FaceDetailerParams`` so the two sides cannot drift; no SAM on either side (Impact's
SAMLoader reads segment-anything ViT checkpoints, none of which exist here). Where the upscaled
crop is not a multiple of 8, ComfyUI's VAEEncode drops the extra rows and columns and we pad
(spec Decision 5), so the images differ by design and our VAE sees ~2 % more pixels; ``--align``
lowers ``max_size`` (from the round-0 detection, with our copy of Impact's upscale rule) to the
largest value whose upscaled crop is a multiple of 8 both ways, where the two must agree.

Rounds alternate the order; round 0 warms up with ``--warmup-steps`` and is not counted; the
median of ``--repeats`` is reported with the machine's load average. Per side it prints the
wall time and the time inside the detector, VAE encode, the UNet calls and VAE decode (timers
around Impact's detector, ComfyUI's ``VAE.encode``/``decode`` and ``BaseModel.apply_model``;
around our family's ``encode_pixels``, ``forward`` and ``decode_latents``) and the rest: the
sampler's own arithmetic, resizes, masks and the paste. It compares the final 8-bit images (max
level difference, pixels more than 2 levels apart) and the crop regions.

Impact imports ComfyUI's web server, ``piexif`` and the upscale-model node (spandrel); none of
them is reached by FaceDetailer, so stand-ins are registered when they cannot be imported; the
Subpack needs ``dill``. Extract the checkouts (never committed) and run it under the heavy lock:

    git -C <ComfyUI repo> archive HEAD | tar -x -C /tmp/comfyui      # also Impact Pack, Subpack
    pip install --target /tmp/deps einops dill
    PYTHONPATH=/tmp/deps python benchmarks/impact_speed.py --comfyui /tmp/comfyui \\
        --impact /tmp/impact --subpack /tmp/subpack --model <sd15 folder> --repeats 2 --json out.json

Both sides share one process by default, and so its allocator: ComfyUI's model loading leaves
gigabytes of freed, already-faulted memory inside glibc's heap, which then serves the big
temporaries of *both* sides without page faults. Start the process with the shipped config's
malloc settings (``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184``) to
time both sides with those, or give ``--ours-env configs/local-cpu.yaml`` to run our side in a
process of its own with the env vars the config gives its replicas, against ComfyUI as it ships
(each side as a user runs it; rounds still alternate). The JSON records which were set.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import statistics
import sys
import time
import types
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from comfy_speed import load_comfy, loadavg  # noqa: E402

MALLOC_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


class _PromptServerStandIn:
    """ComfyUI's server as Impact uses it at import and run time: route decorators, progress messages."""

    class _Routes:
        def __getattr__(self, name: str) -> Callable[..., Callable[[Any], Any]]:
            return lambda *args, **kwargs: lambda handler: handler

    routes = _Routes()

    def send_sync(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_on_prompt_handler(self, *args: Any, **kwargs: Any) -> None:
        pass


def _stand_in(name: str, **attributes: Any) -> None:
    try:
        __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


def load_impact(comfyui: Path, impact: Path, subpack: Path) -> tuple[Any, Any, Any]:
    """(comfy, Impact's impact_pack module, the Subpack's subcore module), imported from checkouts."""
    comfy = load_comfy(comfyui)
    sys.path.insert(0, str(impact / "modules"))
    _stand_in("server", PromptServer=type("PromptServer", (), {"instance": _PromptServerStandIn()}))
    _stand_in("piexif")
    _stand_in("comfy_extras.nodes_upscale_model")
    with contextlib.redirect_stdout(io.StringIO()):
        importlib.import_module("impact.impact_server")  # Impact's own import order: its server, then the nodes
        impact_pack = importlib.import_module("impact.impact_pack")
    from comfy_extras.nodes_differential_diffusion import DifferentialDiffusion

    if not hasattr(DifferentialDiffusion, "apply"):  # Impact (V8.x) calls the node's V1 method; ComfyUI's is V3 now

        def apply(self: Any, model: Any, strength: float = 1.0) -> tuple:
            return DifferentialDiffusion.execute(model, strength).result

        DifferentialDiffusion.apply = apply
    package = types.ModuleType("impact_subpack")  # subcore imports its siblings relatively
    package.__path__ = [str(subpack / "modules")]
    sys.modules["impact_subpack"] = package
    import impact_subpack.subcore as subcore

    return comfy, impact_pack, subcore


class StageClock:
    """Seconds spent inside wrapped callables, by name (Impact's side: detector and VAE calls)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started

        return timed

    def take(self) -> dict[str, float]:
        taken, self.seconds = dict(self.seconds), defaultdict(float)
        return taken


def comfy_models(comfy: Any, model_dir: Path) -> tuple[Any, Any]:
    """ComfyUI's MODEL and VAE on the checkpoint's diffusers weights (its own key conversion)."""
    import logging

    from safetensors.torch import load_file

    logging.getLogger().setLevel(logging.ERROR)  # its diffusers key map warns of keys SD 1.5 does not have
    unet_sd = load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    vae_sd = load_file(str(model_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        patcher = comfy.sd.load_diffusion_model_state_dict(unet_sd)
        vae = comfy.sd.VAE(sd=vae_sd)
    return patcher, vae


def impact_arguments(params: Any) -> dict[str, Any]:
    """FaceDetailer.doit's inputs from our params: the same values on both sides, by the node's names."""
    return {
        "guide_size": params.guide_size, "guide_size_for": params.guide_size_for, "max_size": params.max_size,
        "seed": params.seed, "steps": params.steps, "cfg": params.cfg, "sampler_name": params.sampler_name,
        "scheduler": params.scheduler, "denoise": params.denoise, "feather": params.feather,
        "noise_mask": params.noise_mask, "force_inpaint": params.force_inpaint,
        "bbox_threshold": params.bbox_threshold, "bbox_dilation": params.bbox_dilation,
        "bbox_crop_factor": params.bbox_crop_factor, "sam_detection_hint": params.sam_detection_hint,
        "sam_dilation": params.sam_dilation, "sam_threshold": params.sam_threshold,
        "sam_bbox_expansion": params.sam_bbox_expansion, "sam_mask_hint_threshold": params.sam_mask_hint_threshold,
        "sam_mask_hint_use_negative": params.sam_mask_hint_use_negative, "drop_size": params.drop_size,
        "wildcard": "", "cycle": params.cycle, "inpaint_model": params.inpaint_model,
        "noise_mask_feather": params.noise_mask_feather,
    }  # fmt: skip


def aligned_max_size(segments: list[dict[str, Any]], params: Any) -> float:
    """The largest max_size ≤ the asked one whose upscaled crops are multiples of 8 both ways (no Decision 5)."""
    from facedetailer.guide_size import plan_upscale

    for max_size in range(int(params.max_size), 63, -1):
        sizes = []
        for segment in segments:
            x1, y1, x2, y2 = segment["crop_region"]
            plan = plan_upscale((x2 - x1, y2 - y1), segment["bbox"], guide_size=params.guide_size,
                                guide_size_for_bbox=params.guide_size_for, max_size=max_size,
                                force_inpaint=params.force_inpaint)  # fmt: skip
            sizes.append(plan.new_size)
        if all(width % 8 == 0 and height % 8 == 0 for width, height in sizes):
            return float(max_size)
    raise SystemExit("no max_size puts the upscaled crops on the latent grid")


def save_image_quantised(image: Any) -> np.ndarray:
    """ComfyUI's SaveImage: ``clip(255 * x, 0, 255).astype(uint8)`` — truncation."""
    return np.clip(255.0 * image[0].cpu().numpy(), 0, 255).astype(np.uint8)


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict[str, Any]:
    difference = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    return {
        "max_levels": int(difference.max()),
        "pixels_differing": int((difference.max(axis=-1) > 0).sum()),
        "pixels_over_2_levels": int((difference.max(axis=-1) > 2).sum()),
        "mean_levels": float(difference.mean()),
    }


class OursInProcess:
    """Our side: ``LocalStages.detail`` on the checkpoint, with timers around the family's model stages."""

    def __init__(self, model_dir: str) -> None:
        from deployments.detector import FaceDetector
        from deployments.model_loading import load_inpainter
        from deployments.testing import assets
        from serve_app.local import LocalStages

        self.inpainter = load_inpainter(model_dir, device="cpu", dtype="float32")
        detector = FaceDetector(str(assets.faceghost_face_onnx()), task="detect", device="cpu")
        self.stages = LocalStages(detector=detector, inpainter=self.inpainter)
        self.clock = StageClock()
        family = self.inpainter.family
        family.encode_pixels = self.clock.wrap("vae_encode", family.encode_pixels)
        family.decode_latents = self.clock.wrap("vae_decode", family.decode_latents)
        family.forward = self.clock.wrap("unet", family.forward)
        self.image = np.ascontiguousarray(assets.astronaut())

    def conditioning(self, text: str) -> tuple[Any, Any]:
        """(context, pooled) as the inpainter encodes ``text``: what Impact is given as CONDITIONING."""
        return self.inpainter._encode_prompt((text,))

    def run(self, steps: int, max_size: float, threads: int) -> dict[str, Any]:
        import torch

        from facedetailer.params import FaceDetailerParams

        torch.set_num_threads(threads)  # ultralytics resets it process-wide
        started = time.perf_counter()
        result = self.stages.detail([self.image], FaceDetailerParams(steps=steps, max_size=max_size, seed=0))
        wall = time.perf_counter() - started
        per_image = result.per_image[0]
        segments = [
            {"crop_region": list(segment.crop_region), "bbox": list(segment.bbox),
             "upscaled_size": list(segment.upscaled_size or ())}
            for segment in per_image.segments if not segment.skipped
        ]  # fmt: skip
        timings = {f"pipeline_{stage}": seconds for stage, seconds in result.timings.items()}
        timings.update(self.clock.take())
        timings["detect"] = timings.get("pipeline_detect", 0.0)
        return {"image": per_image.image, "timings": timings, "segments": segments, "wall": wall}

    def close(self) -> None:
        pass


def ours_worker(connection: Any, model_dir: str) -> None:
    """Our side in a process of its own, answering (method, args) messages until None."""
    side = OursInProcess(model_dir)
    connection.send("ready")
    while (message := connection.recv()) is not None:
        method, args = message
        connection.send(getattr(side, method)(*args))


class OursInChild:
    """Our side in a spawned process started with the served replicas' environment (their malloc settings)."""

    def __init__(self, model_dir: str, env: dict[str, str]) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)  # read by the child's glibc and OpenMP at start
        try:
            self.process = context.Process(target=ours_worker, args=(child, model_dir), daemon=True)
            self.process.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        if self.connection.recv() != "ready":
            raise SystemExit("our side's process did not start")

    def _call(self, method: str, *args: Any) -> Any:
        self.connection.send((method, args))
        return self.connection.recv()

    def conditioning(self, text: str) -> tuple[Any, Any]:
        return self._call("conditioning", text)

    def run(self, steps: int, max_size: float, threads: int) -> dict[str, Any]:
        return self._call("run", steps, max_size, threads)

    def close(self) -> None:
        self.connection.send(None)
        self.process.join(timeout=60)


def served_env(config: Path) -> dict[str, str]:
    """The first application's ``runtime_env.env_vars`` of a Serve config: what its replicas run with."""
    import yaml

    application = yaml.safe_load(config.read_text())["applications"][0]
    return {name: str(value) for name, value in application.get("runtime_env", {}).get("env_vars", {}).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI checkout")
    parser.add_argument("--impact", type=Path, required=True, help="ComfyUI-Impact-Pack checkout")
    parser.add_argument("--subpack", type=Path, required=True, help="ComfyUI-Impact-Subpack checkout")
    parser.add_argument("--model", type=Path, help="SD 1.5 diffusers folder (default: random_models.py's sd15)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--max-size", type=float, default=512)
    parser.add_argument(
        "--align", action="store_true", help="lower max_size to put the upscaled crop on the latent grid"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--ours-env",
        type=Path,
        help="run our side in its own process with this Serve config's env_vars (e.g. configs/local-cpu.yaml)",
    )
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    from deployments.runtime_env import apply_offline_env

    apply_offline_env(Path(os.environ.get("YOLO_CONFIG_DIR", "/tmp/facedetailer-ultralytics")))
    import torch

    from deployments.testing import assets
    from facedetailer.params import FaceDetailerParams

    model_dir = options.model
    if model_dir is None:
        from random_models import build

        model_dir = Path(build("sd15")["pipeline"])
    ours_env = served_env(options.ours_env) if options.ours_env else None
    conditions = {"loadavg_start": loadavg(), "threads": options.threads,
                  "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                  "malloc_impact": {name: os.environ.get(name) for name in MALLOC_VARIABLES},
                  "ours": "own process" if ours_env else "same process",
                  "malloc_ours": {name: (ours_env or os.environ).get(name) for name in MALLOC_VARIABLES}}  # fmt: skip
    # our side first: a spawned child must not inherit the checkouts on sys.path
    ours = OursInChild(str(model_dir), ours_env) if ours_env is not None else OursInProcess(str(model_dir))
    comfy, impact_pack, subcore = load_impact(options.comfyui, options.impact, options.subpack)
    detector_path = str(assets.faceghost_face_onnx())

    clock = StageClock()
    patcher, vae = comfy_models(comfy, model_dir)
    vae.encode = clock.wrap("vae_encode", vae.encode)
    vae.decode = clock.wrap("vae_decode", vae.decode)
    patcher.model.apply_model = clock.wrap("unet", patcher.model.apply_model)  # every clone shares this model
    with contextlib.redirect_stdout(io.StringIO()):
        bbox_detector = subcore.UltraBBoxDetector(subcore.load_yolo(detector_path))
    detected: list[Any] = []

    def detect_and_keep(*args: Any, **kwargs: Any) -> Any:
        segs = detect(*args, **kwargs)
        detected[:] = [seg.crop_region for seg in segs[1]]
        return segs

    detect = clock.wrap("detect", bbox_detector.detect)
    bbox_detector.detect = detect_and_keep

    def conditioning(text: str) -> list:
        context, pooled = ours.conditioning(text)
        return [[context, {"pooled_output": pooled} if pooled is not None else {}]]

    image = np.ascontiguousarray(assets.astronaut())
    image_tensor = torch.from_numpy(image.astype(np.float32) / 255.0)[None]
    node = impact_pack.FaceDetailer()

    def run_impact(params: FaceDetailerParams) -> tuple[np.ndarray, dict[str, float]]:
        with contextlib.redirect_stdout(io.StringIO()), torch.inference_mode():  # as ComfyUI's executor runs a node
            result = node.doit(image_tensor, patcher, None, vae, positive=conditioning(params.positive),
                               negative=conditioning(params.negative), bbox_detector=bbox_detector,
                               **impact_arguments(params))  # fmt: skip
        return save_image_quantised(result[0]), clock.take()

    segments: list[dict[str, Any]] = []
    max_size = options.max_size

    sides = ("impact", "ours")
    walls: dict[str, list[float]] = {side: [] for side in sides}
    stages: dict[str, dict[str, list[float]]] = {side: defaultdict(list) for side in sides}
    finals: dict[str, np.ndarray] = {}
    regions: dict[str, list] = {}
    for repeat in range(options.repeats + 1):  # round 0 warms up (not counted)
        steps = options.warmup_steps if repeat == 0 else options.steps
        if repeat == 1 and options.align:
            max_size = aligned_max_size(segments, FaceDetailerParams(max_size=options.max_size))
        params = FaceDetailerParams(steps=steps, max_size=max_size, seed=0)
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            if side == "impact":
                torch.set_num_threads(options.threads)  # ultralytics resets it process-wide
                started = time.perf_counter()
                final, timings = run_impact(params)
                wall = time.perf_counter() - started
                regions[side] = [list(region) for region in detected]
            else:
                answer = ours.run(steps, max_size, options.threads)
                final, timings, wall, segments[:] = (
                    answer["image"],
                    answer["timings"],
                    answer["wall"],
                    answer["segments"],
                )
                regions[side] = [segment["crop_region"] for segment in segments]
            finals[side] = final
            model_stages = ("detect", "vae_encode", "unet", "vae_decode")
            # the sampler's own arithmetic, the crop's resizes, masks and the paste
            timings["rest"] = wall - sum(timings.get(stage, 0.0) for stage in model_stages)
            if repeat:
                walls[side].append(wall)
                for stage, seconds in timings.items():
                    stages[side][stage].append(seconds)
            print(f"[{time.strftime('%H:%M:%S')}] round {repeat} {side}: {wall:.1f} s (load {loadavg()[0]:.1f})",
                  file=sys.stderr, flush=True)  # fmt: skip
    conditions["loadavg_end"] = loadavg()
    faces = len(regions["ours"])
    results: dict[str, Any] = {
        "conditions": conditions, "model": str(model_dir), "steps": options.steps, "max_size": max_size,
        "upscaled_sizes": [segment["upscaled_size"] for segment in segments],
        "repeats": options.repeats, "faces": faces, "crop_regions": regions,
        "sides": {side: {"wall_s": statistics.median(walls[side]), "walls_s": walls[side],
                         "stages_s": {stage: statistics.median(values) for stage, values in stages[side].items()}}
                  for side in sides},
        "image_ours_vs_impact": compare(finals["ours"], finals["impact"]),
    }  # fmt: skip
    results["wall_ratio"] = results["sides"]["ours"]["wall_s"] / results["sides"]["impact"]["wall_s"]
    print(f"astronaut, {faces} face(s), {options.steps} steps, max_size {max_size:g} (upscaled crops "
          f"{results['upscaled_sizes']}); {options.threads} threads; ours in the {conditions['ours']}; malloc: "
          f"Impact {conditions['malloc_impact']}, ours {conditions['malloc_ours']}; "
          f"load {conditions['loadavg_start']} → {conditions['loadavg_end']}")  # fmt: skip
    print(f"crop regions: ours {regions['ours']}, Impact {regions['impact']}")
    for side in sides:
        row = results["sides"][side]
        stage_text = ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in sorted(row["stages_s"].items()))
        walls_text = " / ".join(f"{wall:.1f}" for wall in row["walls_s"])
        print(f"{side}: {row['wall_s']:.2f} s per image ({walls_text}); {stage_text}")
    print(f"ours / Impact wall: {results['wall_ratio']:.3f}×; image: {results['image_ours_vs_impact']}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=1))
    ours.close()


if __name__ == "__main__":
    main()
