#!/usr/bin/env python
"""In-process speed of the inpainter and the whole FaceDetailer cycle, before vs after a rewrite.

The inpainter engine rewrite (issue 9) must keep the in-process pipeline at least as fast as
before. This script times the same inputs with whatever code is first on ``sys.path``, so the old
code can be measured from an export of ``main``::

    git archive main | tar -x -C /tmp/fd-main
    PYTHONPATH=/tmp/fd-main .venv/bin/python benchmarks/inprocess_speed.py --json /tmp/before.json
    .venv/bin/python benchmarks/inprocess_speed.py --json /tmp/after.json --compare /tmp/before.json

Only the public API both versions share is used: ``Inpainter(...).refine(jobs, settings)``,
``RefineJob``, ``SamplingSettings`` and ``LocalStages(...).detail``. Times are medians over
``--repeats`` runs after one warm-up, with ``torch.set_num_threads(--threads)``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TINY_MODELS = REPO / ".cache" / "tests" / "tiny-models"


def crop(height: int, width: int, seed: int) -> Any:
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def soft_mask(height: int, width: int) -> Any:
    """An ellipse feathered like a face mask (values in [0, 1], soft edges)."""
    import numpy as np

    from facedetailer.blend import feather_mask

    y, x = np.mgrid[0:height, 0:width]
    inside = ((y - height / 2) / (height * 0.35)) ** 2 + ((x - width / 2) / (width * 0.3)) ** 2 <= 1
    return feather_mask(inside.astype(np.float32), 20)


REFINE_CASES: list[dict[str, Any]] = [
    {"name": "1 crop 256x256, euler/normal, 20 steps", "crops": 1, "size": 256, "settings": {}},
    {"name": "4 crops 256x256, euler/normal, 20 steps", "crops": 4, "size": 256, "settings": {}},
    {"name": "1 crop 256x256, heun/karras, 10 steps", "crops": 1, "size": 256,
     "settings": {"sampler_name": "heun", "scheduler": "karras", "steps": 10}},
    {"name": "1 crop 256x256, dpmpp_2m/karras, 20 steps", "crops": 1, "size": 256,
     "settings": {"sampler_name": "dpmpp_2m", "scheduler": "karras"}},
    {"name": "1 crop 256x256, euler_ancestral/normal, 20 steps", "crops": 1, "size": 256,
     "settings": {"sampler_name": "euler_ancestral"}},
    {"name": "8 crops 64x64, euler/normal, 20 steps", "crops": 8, "size": 64, "settings": {}},
]  # fmt: skip


def timed(function: Any, repeats: int, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    function()  # warm-up
    samples = []
    for _ in range(repeats):
        torch.set_num_threads(threads)  # ultralytics resets it process-wide
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="where to write the measurements")
    parser.add_argument("--compare", type=Path, help="a previous --json to print ratios against")
    parser.add_argument("--before", type=Path, nargs="*", help="summary only: runs of the old code")
    parser.add_argument("--after", type=Path, nargs="*", help="summary only: runs of the new code")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    if opts.before and opts.after:
        print(summary(opts.before, opts.after))
        return
    if opts.json is None:
        parser.error("--json is required to measure")

    os.environ.setdefault("FACEDETAILER_TINY_MODELS", str(DEFAULT_TINY_MODELS))
    from deployments.runtime_env import apply_offline_env

    apply_offline_env(Path(os.environ.get("YOLO_CONFIG_DIR", "/tmp/facedetailer-ultralytics")))
    import numpy as np

    import deployments
    from deployments.detector import FaceDetector
    from deployments.inpainter import Inpainter, RefineJob, SamplingSettings
    from deployments.testing import assets
    from deployments.testing.build_tiny_models import build_component
    from facedetailer.params import FaceDetailerParams
    from serve_app.local import LocalStages

    code = str(Path(deployments.__file__).resolve().parent.parent)
    print(f"code under test: {code}", file=sys.stderr)
    tiny = build_component("sd", Path(os.environ["FACEDETAILER_TINY_MODELS"]) / "sd")
    inpainter = Inpainter(tiny["pipeline"], device="cpu")
    results: dict[str, Any] = {"code": code, "threads": opts.threads, "repeats": opts.repeats, "cases": {}}

    for case in REFINE_CASES:
        size = case["size"]
        jobs = [
            RefineJob(
                image=crop(size, size, seed),
                noise_mask=soft_mask(size, size),
                positive=("a photo of a face",),
                negative=("blurry",),
                seed=seed,
            )
            for seed in range(case["crops"])
        ]
        settings = SamplingSettings(**{"steps": 20, "denoise": 0.5, "cfg": 8.0, **case["settings"]})
        run = lambda j=jobs, s=settings: inpainter.refine(j, s)  # noqa: E731
        results["cases"][case["name"]] = timed(run, opts.repeats, opts.threads)
        print(f"{case['name']}: {results['cases'][case['name']]['median']:.3f} s", file=sys.stderr)

    stages = LocalStages(
        detector=FaceDetector(str(assets.faceghost_face_onnx()), task="detect", device="cpu"), inpainter=inpainter
    )
    image = np.ascontiguousarray(assets.astronaut())
    params = FaceDetailerParams(steps=20, guide_size=256, max_size=512, seed=0)
    name = "detail astronaut.png (1 face), steps 20, guide 256 / max 512"
    results["cases"][name] = timed(lambda: stages.detail([image], params), opts.repeats, opts.threads)
    print(f"{name}: {results['cases'][name]['median']:.3f} s", file=sys.stderr)

    opts.json.write_text(json.dumps(results, indent=2))
    if opts.compare:
        before = json.loads(opts.compare.read_text())
        print("\n| case | before | after | after / before |\n|---|---|---|---|")
        for name, after in results["cases"].items():
            old = before["cases"].get(name)
            if old:
                ratio = after["median"] / old["median"]
                print(f"| {name} | {old['median']:.3f} s | {after['median']:.3f} s | {ratio:.3f} |")


def summary(before: list[Path], after: list[Path]) -> str:
    """Markdown table over several interleaved runs: the fastest and the median sample of each side."""

    def samples(paths: list[Path]) -> dict[str, list[float]]:
        merged: dict[str, list[float]] = {}
        for path in paths:
            for name, case in json.loads(path.read_text())["cases"].items():
                merged.setdefault(name, []).extend(case["samples"])
        return merged

    old, new = samples(before), samples(after)
    lines = [
        "| case | before: fastest / median | after: fastest / median | after ÷ before (fastest) | (median) |",
        "|---|---|---|---|---|",
    ]
    for name, values in new.items():
        if name not in old:
            continue
        a, b = min(old[name]), min(values)
        ma, mb = statistics.median(old[name]), statistics.median(values)
        lines.append(f"| {name} | {a:.3f} / {ma:.3f} s | {b:.3f} / {mb:.3f} s | {b / a:.3f} | {mb / ma:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
