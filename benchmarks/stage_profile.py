#!/usr/bin/env python
"""Where a model stage's time goes, ours against ComfyUI's, on the same weights and the same crop.

Builds the full-size SD 1.5 VAE and UNet (published configs, seeded random weights, as
``comfy_speed.py``), loads the SAME weights into ComfyUI's ``comfy.sd.VAE`` and its UNet (a
checkout given with ``--comfyui``; not a dependency) and runs VAE encode and decode of a
``--crop``-px crop (``--crop W``, or ``WxH`` for a non-square one) and one CFG step of the UNet
(2 rows, 77 tokens) on its latent, on both sides under ``torch.profiler`` with the replicas'
thread count. Prints, per stage and side, the wall time of the profiled call, the operator table
(self CPU time, calls) and the bytes allocated, so that a difference can be pinned to operators
(convolutions, GroupNorm, SiLU, attention, copies).

    PYTHONPATH=/tmp/deps python benchmarks/stage_profile.py --comfyui /tmp/comfyui [--crop 512] \
        [--stages vae_encode,unet,vae_decode] [--json out.json]

Run it under the heavy lock on an otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from comfy_speed import SD15_UNET, build_weights, comfy_side, load_comfy, loadavg, ours  # noqa: E402


def op_table(prof: Any, rows: int) -> list[dict[str, Any]]:
    events = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    return [
        {
            "op": event.key,
            "calls": event.count,
            "self_ms": event.self_cpu_time_total / 1000,
            "self_mb": event.self_cpu_memory_usage / 2**20,
        }  # fmt: skip
        for event in events[:rows]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, required=True)
    parser.add_argument("--crop", default="512", help="W or WxH, multiples of 8")
    parser.add_argument("--stages", default="vae_encode,vae_decode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--sides", default="ours,comfy")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    comfy = load_comfy(options.comfyui)
    stages = options.stages.split(",")
    vae_only = "unet" not in stages
    unet_sd, vae_sd = build_weights(0)
    if vae_only:
        unet_sd = {}
    generator = torch.Generator().manual_seed(1)
    width, _, height = options.crop.partition("x")
    width, height = int(width), int(height or width)
    latent = torch.randn(2, 4, height // 8, width // 8, generator=generator)
    inputs = {
        "vae_encode": (torch.rand(1, 3, height, width, generator=generator) * 2 - 1,),
        "unet": (
            latent,
            torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, SD15_UNET["cross_attention_dim"], generator=generator),
        ),
        "vae_decode": (latent[:1],),
    }
    inputs = {stage: inputs[stage] for stage in stages}
    results: dict[str, Any] = {
        "loadavg_start": loadavg(),
        "crop": [width, height],
        "threads": options.threads,
        "runs": {},
    }
    for name in options.sides.split(","):
        if name == "ours":
            calls = ours(unet_sd, vae_sd, options.precision, vae_only=vae_only)
        else:
            calls = comfy_side(comfy, unet_sd, vae_sd, options.precision, vae_only=vae_only)
        calls.pop("dtypes", None)
        with torch.inference_mode():
            for stage, args in inputs.items():
                calls[stage](*args)  # warm-up
                started = time.perf_counter()
                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    calls[stage](*args)
                elapsed = time.perf_counter() - started
                table = op_table(prof, options.rows)
                results["runs"][f"{name}/{stage}"] = {"wall_s": elapsed, "ops": table}
                print(f"\n== {name} {stage}: {elapsed:.2f} s (profiled)")
                for row in table:
                    print(
                        f"  {row['op']:42s} {row['calls']:5d} calls {row['self_ms']:9.1f} ms {row['self_mb']:9.0f} MB"
                    )
    results["loadavg_end"] = loadavg()
    print(f"\nload {results['loadavg_start']} → {results['loadavg_end']}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
