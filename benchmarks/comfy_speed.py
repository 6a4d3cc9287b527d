#!/usr/bin/env python
"""Stage race against ComfyUI on the same weights: VAE encode, one UNet step, VAE decode — fp32 and bf16.

Builds the full-size SD 1.5 UNet and VAE (their published configs, ``random_models.py``; seeded
random weights, in memory, no files) and loads the SAME weights into ComfyUI's own modules
(``comfy.sd.VAE`` and ``comfy.sd.load_diffusion_model_state_dict``, from a checkout given with
``--comfyui``; ComfyUI is not a dependency). Then times, with the replicas' thread count
(``--threads``, 2 as ``configs/local-cpu.yaml``), repetitions interleaved, median:

- ``vae_encode``: a ``--crop``-px face crop → latent (ours: the inpainter's ``encode_pixels`` call on
  the diffusers VAE; ComfyUI: ``VAE.encode`` of the [B, H, W, C] image, its own input processing);
- ``unet``: one CFG step of the sampler's model call, 2 rows (cond + uncond) at the crop's latent
  size, 77 tokens of context (ours: the family's ``forward`` call on the diffusers UNet; ComfyUI:
  ``BaseModel.apply_model``);
- ``vae_decode``: the latent → pixels.

Precisions: ``fp32`` on both sides; ``bf16``: ours with ``precision: bf16`` (the checkpoint's UNet
and VAE in bfloat16, computed in bfloat16 by oneDNN), ComfyUI with its ``--bf16-unet --bf16-vae``
flags set (``comfy.cli_args.args``), which on a CPU store the weights in bf16 and — its
``should_use_bf16`` says no for CPUs — cast them back to fp32 per layer. Further variants of ours
(``--ours-extra``): ``fp32-cl`` (channels_last memory format) and ``fp32-diffusers`` (diffusers' own
ResNet-block forward instead of the served SD family's in-place one,
``deployments/families/lean_forward.py``). Each of our stages reports its max |difference| to
ComfyUI's output of the same precision. ``modelled_face`` adds encode + ``--steps`` × UNet step +
decode: the model time of one face at node defaults (detection, SAM and the paste are not in it).

    python benchmarks/comfy_speed.py --comfyui /tmp/comfyui [--crop 512] [--repeats 5] [--json out.json]

Run it under the heavy lock on an otherwise quiet machine; it records the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from random_models import SD15_UNET, SD_VAE  # noqa: E402

STAGES = ("vae_encode", "unet", "vae_decode")


def loadavg() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def load_comfy(path: Path) -> Any:
    """ComfyUI's ``comfy.sd`` (and its args) from a checkout, CPU only, quiet."""
    sys.path.insert(0, str(path))
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args
        import comfy.sd
    finally:
        sys.argv = argv
    return comfy


def build_weights(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """State dicts of the full-size SD 1.5 UNet and VAE (diffusers layout), seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD_VAE)
    return unet.state_dict(), vae.state_dict()


def ours(unet_sd: dict, vae_sd: dict, precision: str, vae_only: bool = False) -> dict[str, Callable[..., torch.Tensor]]:
    """Our stage calls, as the inpainter makes them (deployments/families/base.py, sd.py)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from deployments.families.lean_forward import use_lean_forward

    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    with torch.device("meta"):
        unet = None if vae_only else UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD_VAE)
    vae.load_state_dict(vae_sd, assign=True)
    vae = vae.to(dtype).eval().requires_grad_(False)
    if not precision.endswith("-diffusers"):  # the served SD family's VAE (deployments/families/sd.py)
        use_lean_forward(vae)
    if unet is not None:
        unet.load_state_dict(unet_sd, assign=True)
        unet = unet.to(dtype).eval().requires_grad_(False)
        if not precision.endswith("-diffusers"):  # the served SD family's UNet, likewise
            use_lean_forward(unet)
    if precision.endswith("-cl"):
        vae = vae.to(memory_format=torch.channels_last)
        if unet is not None:
            unet = unet.to(memory_format=torch.channels_last)
    scale = SD_VAE["scaling_factor"]

    def encode(pixels: torch.Tensor) -> torch.Tensor:  # pixels [B, 3, H, W] in [-1, 1]
        return vae.encode(pixels.to(dtype)).latent_dist.mean.float() * scale

    def step(sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(sample.to(dtype), timesteps, encoder_hidden_states=context.to(dtype), return_dict=False)[0].float()

    def decode(latent: torch.Tensor) -> torch.Tensor:
        return vae.decode((latent / scale).to(dtype)).sample.float()

    return {"vae_encode": encode, "unet": step, "vae_decode": decode}


def comfy_side(
    comfy: Any, unet_sd: dict, vae_sd: dict, precision: str, vae_only: bool = False
) -> dict[str, Callable[..., torch.Tensor]]:
    """ComfyUI's stage calls on the same weights; ``bf16`` = its --bf16-unet --bf16-vae flags."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # its diffusers key map warns of keys SD 1.5 does not have
    args = comfy.cli_args.args
    args.bf16_unet = args.bf16_vae = precision == "bf16"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        vae = comfy.sd.VAE(sd={key: value.clone() for key, value in vae_sd.items()})
        if vae_only:  # the SD 1.x latent scaling without a UNet
            from comfy.latent_formats import SD15

            latent_format = SD15()
            vae.latent_format = latent_format
            return {"vae_encode": lambda pixels: latent_format.process_in(vae.encode((pixels.movedim(1, -1) + 1) / 2)),
                    "vae_decode": lambda latent: vae.decode(latent_format.process_out(latent)).movedim(-1, 1) * 2 - 1}
        patcher = comfy.sd.load_diffusion_model_state_dict({key: value.clone() for key, value in unet_sd.items()})
    model = patcher.model

    def encode(pixels: torch.Tensor) -> torch.Tensor:  # ComfyUI's IMAGE: [B, H, W, C] in [0, 1]
        image = (pixels.movedim(1, -1) + 1) / 2
        return model.process_latent_in(vae.encode(image)).float()

    def step(sample: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        sigma = model.model_sampling.sigma(timesteps)
        x = sample * (sigma**2 + 1).sqrt()[:, None, None, None]  # apply_model divides by it again (c_in)
        denoised = model.apply_model(x, sigma, c_crossattn=context).float()
        return (x - denoised) / sigma[:, None, None, None]  # back to the model's raw output (eps), as ours

    def decode(latent: torch.Tensor) -> torch.Tensor:
        return vae.decode(model.process_latent_out(latent)).movedim(-1, 1).float() * 2 - 1

    return {"vae_encode": encode, "unet": step, "vae_decode": decode, "dtypes": (model.get_dtype(), vae.vae_dtype)}


def clamped(stage: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clamp(-1, 1) if stage == "vae_decode" else tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--crop", type=int, default=512, help="face crop side in px (latent side = crop / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--ours-extra", default="fp32-cl", help="our further variants (no ComfyUI counterpart)")
    parser.add_argument("--extra-stages", default="vae_encode,vae_decode", help="stages the further variants run")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--steps", type=int, default=20, help="modelled face: encode + steps × UNet + decode")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    stages = options.stages.split(",")
    conditions = {"loadavg_start": loadavg(), "threads": options.threads, "torch": torch.__version__,
                  "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                  "malloc_env": {key: val for key, val in os.environ.items() if key.startswith("MALLOC_")}}  # fmt: skip
    comfy = load_comfy(options.comfyui)
    unet_sd, vae_sd = build_weights(0)
    generator = torch.Generator().manual_seed(1)
    side, latent_side = options.crop, options.crop // 8
    inputs = {
        "vae_encode": (torch.rand(1, 3, side, side, generator=generator) * 2 - 1,),
        "unet": (
            torch.randn(2, 4, latent_side, latent_side, generator=generator),
            torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, 768, generator=generator),
        ),
        "vae_decode": (torch.randn(1, 4, latent_side, latent_side, generator=generator),),
    }
    results: dict[str, Any] = {"conditions": conditions, "crop": side, "stages": {}}
    extras = [name for name in options.ours_extra.split(",") if name]
    extra_stages = options.extra_stages.split(",")
    for precision in options.precisions.split(","):
        contenders = {f"ours-{precision}": ours(unet_sd, vae_sd, precision),
                      f"comfy-{precision}": comfy_side(comfy, unet_sd, vae_sd, precision)}  # fmt: skip
        if precision == "fp32":
            contenders.update({f"ours-{name}": ours(unet_sd, vae_sd, name) for name in extras})
        dtypes = contenders[f"comfy-{precision}"].pop("dtypes")
        results.setdefault("comfy_dtypes", {})[precision] = [str(dtype) for dtype in dtypes]
        times: dict[tuple[str, str], list[float]] = {}
        outputs: dict[tuple[str, str], torch.Tensor] = {}
        with torch.inference_mode():
            for repeat in range(options.repeats + 1):  # the first round warms up (not counted)
                for stage in stages:
                    names = list(contenders) if repeat % 2 == 0 else list(contenders)[::-1]
                    for name in names:
                        if name.removeprefix("ours-") in extras and stage not in extra_stages:
                            continue
                        started = time.perf_counter()
                        out = contenders[name][stage](*inputs[stage])
                        elapsed = time.perf_counter() - started
                        if repeat == 0:
                            outputs[(name, stage)] = out
                        else:
                            times.setdefault((name, stage), []).append(elapsed)
                        print(f"  [{time.strftime('%H:%M:%S')}] round {repeat} {stage} {name} {elapsed:.2f} s",
                              file=sys.stderr, flush=True)
        for (name, stage), values in times.items():
            reference = outputs[(f"comfy-{precision}", stage)]
            row = results["stages"].setdefault(stage, {})
            row[name] = {
                "median_s": statistics.median(values),
                "min_s": min(values),
                # decoded pixels compared clamped to [-1, 1], as both pipelines quantise them
                "max_abs_diff_vs_comfy": float((clamped(stage, outputs[(name, stage)]) - clamped(stage, reference))
                                               .abs().max()),
                "reference_max_abs": float(reference.abs().max()),
            }
        del contenders, outputs
        gc.collect()
    conditions["loadavg_end"] = loadavg()
    print(f"crop {side}px, {options.threads} threads, median of {options.repeats}; load {conditions['loadavg_start']}"
          f" → {conditions['loadavg_end']}; ComfyUI's run dtypes (unet, vae): {results['comfy_dtypes']}")  # fmt: skip
    for stage, row in results["stages"].items():
        for precision in options.precisions.split(","):
            reference = row.get(f"comfy-{precision}")
            for name, figures in row.items():
                if not name.endswith(precision) and not (precision == "fp32" and name.startswith("ours-fp32")):
                    continue
                ratio = figures["median_s"] / reference["median_s"] if reference else float("nan")
                print(f"{stage:10s} {name:14s} {figures['median_s'] * 1000:8.0f} ms  ×{ratio:5.2f} of comfy-{precision}"
                      f"  max|Δ| {figures['max_abs_diff_vs_comfy']:.3g} (of {figures['reference_max_abs']:.3g})")
    faces = modelled_faces(results["stages"], options.steps)
    if faces:
        results["modelled_face"] = faces
        for name, seconds in faces.items():
            reference = faces.get("comfy-" + name.split("-")[1])  # ours-fp32-cl → comfy-fp32
            ratio = seconds / reference if reference else float("nan")
            print(f"face (encode + {options.steps} × UNet + decode) {name:14s} {seconds:7.1f} s  ×{ratio:5.2f}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=1))


def modelled_faces(stages: dict[str, dict[str, Any]], steps: int) -> dict[str, float]:
    """Per contender: encode + ``steps`` × one CFG UNet step + decode (medians) — the model time of one face."""
    if set(STAGES) - set(stages):
        return {}
    names = set.intersection(*(set(stages[stage]) for stage in STAGES))
    return {
        name: stages["vae_encode"][name]["median_s"] + steps * stages["unet"][name]["median_s"]
        + stages["vae_decode"][name]["median_s"]
        for name in sorted(names)
    }


if __name__ == "__main__":
    main()
