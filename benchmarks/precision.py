#!/usr/bin/env python
"""Opt-in reduced precision, in-process: per-face time and the final image's PSNR inside the crop vs fp32.

The parity set-up of the issue: full-size SD 1.5 with seeded random weights
(``random_models.py sd15``, built once), the packaged face YOLO, skimage's astronaut (one face),
FaceDetailer's node defaults with ``max_size`` 512. The same checkpoint is loaded once per
precision (``precision: bf16`` is the checkpoint option of the same name: UNet, VAE and text
encoders in bfloat16), and ``LocalStages.detail`` runs the whole cycle, repetitions interleaved
(fp32, bf16, bf16, fp32, …), median. Reported: wall time per face and the stages' times (detect,
inpaint, paste, …), and the PSNR of each precision's final 8-bit image against fp32's inside the
face's crop region (outside it both are the input, bit for bit).

    python benchmarks/precision.py [--precisions fp32,bf16] [--repeats 3] [--json out.json]

Run it under the heavy lock on an otherwise quiet machine; it records the load average.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def loadavg() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="SD 1.5 folder (default: random_models.py's sd15, built on first use)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    from deployments.runtime_env import apply_offline_env

    apply_offline_env(Path(os.environ.get("YOLO_CONFIG_DIR", "/tmp/facedetailer-ultralytics")))
    import torch

    from deployments.detector import FaceDetector
    from deployments.model_loading import load_inpainter
    from deployments.testing import assets
    from facedetailer.params import FaceDetailerParams
    from serve_app.local import LocalStages

    model = options.model
    if model is None:
        from random_models import build

        model = build("sd15")["pipeline"]
    conditions = {"loadavg_start": loadavg(), "threads": options.threads,
                  "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}  # fmt: skip
    detector = FaceDetector(str(assets.faceghost_face_onnx()), task="detect", device="cpu")
    precisions = options.precisions.split(",")
    stages = {
        precision: LocalStages(detector=detector, inpainter=load_inpainter(model, device="cpu",
                                                                            dtype=DTYPES[precision]))
        for precision in precisions
    }  # fmt: skip
    image = np.ascontiguousarray(assets.astronaut())
    params = FaceDetailerParams(steps=options.steps, max_size=512, seed=0)
    walls: dict[str, list[float]] = {precision: [] for precision in precisions}
    timings: dict[str, dict[str, list[float]]] = {precision: {} for precision in precisions}
    finals: dict[str, Any] = {}
    for repeat in range(options.repeats + 1):  # round 0 warms up (not counted)
        order = precisions if repeat % 2 == 0 else precisions[::-1]
        for precision in order:
            torch.set_num_threads(options.threads)  # ultralytics resets it process-wide
            started = time.perf_counter()
            result = stages[precision].detail([image], params)
            wall = time.perf_counter() - started
            finals[precision] = result.per_image[0]
            if repeat:
                walls[precision].append(wall)
                for stage, seconds in result.timings.items():
                    timings[precision].setdefault(stage, []).append(seconds)
            print(f"[{time.strftime('%H:%M:%S')}] {precision}: {wall:.1f} s", file=sys.stderr, flush=True)
    reference = finals[precisions[0]]
    [segment] = [segment for segment in reference.segments if not segment.skipped]
    x1, y1, x2, y2 = segment.crop_region
    results: dict[str, Any] = {"conditions": conditions, "model": str(model), "steps": options.steps,
                               "crop_region": [x1, y1, x2, y2], "precisions": {}}  # fmt: skip
    for precision in precisions:
        final = finals[precision].image
        outside = final.copy()
        outside[y1:y2, x1:x2] = reference.image[y1:y2, x1:x2]
        results["precisions"][precision] = {
            "wall_s": statistics.median(walls[precision]),
            "stages_s": {stage: statistics.median(values) for stage, values in timings[precision].items()},
            "psnr_in_crop_db": psnr(final[y1:y2, x1:x2], reference.image[y1:y2, x1:x2]),
            "identical_outside_crop": bool(np.array_equal(outside, reference.image)),
        }
    conditions["loadavg_end"] = loadavg()
    base = results["precisions"][precisions[0]]["wall_s"]
    print(f"astronaut, 1 face, {options.steps} steps, max_size 512, crop {x2 - x1}x{y2 - y1}; "
          f"{options.threads} threads; load {conditions['loadavg_start']} → {conditions['loadavg_end']}")  # fmt: skip
    for precision, row in results["precisions"].items():
        stages_text = ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in row["stages_s"].items())
        print(f"{precision}: {row['wall_s']:.2f} s per face (×{row['wall_s'] / base:.2f}), PSNR in crop "
              f"{row['psnr_in_crop_db']:.1f} dB vs {precisions[0]}; {stages_text}")
    if options.json:
        options.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
