#!/usr/bin/env python
"""Ray Serve's own round trip on this machine: the floor under any served latency figure.

A deployment whose method does nothing is called through its handle, from the driver, with
(a) no arguments, (b) a 512×512 crop job as the inpainter receives it (uint8 image and float32
noise mask) and (c) the image alone; the three kinds of call are interleaved. What a served
lone crop adds beyond its model time can be no less than (b) — whatever the engine does.

    .venv/bin/python benchmarks/serve_roundtrip.py --json benchmarks/continuous_batching/roundtrip.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=60, help="calls of each kind (after 5 warm-up calls)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", type=Path, required=True)
    opts = parser.parse_args()

    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.5, "num_gpus": 0})
    class Nothing:
        def call(self, *arguments: Any) -> dict[str, int]:
            return {"arguments": len(arguments)}

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (opts.size, opts.size, 3), dtype=np.uint8)
    mask = rng.random((opts.size, opts.size), dtype=np.float32)
    kinds: dict[str, tuple[Any, ...]] = {"empty": (), "crop_job": (image, mask), "image_only": (image,)}
    started = time.time()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(Nothing.bind(), name="roundtrip", route_prefix=None)
        for arguments in kinds.values():
            for _ in range(5):
                handle.call.remote(*arguments).result(timeout_s=60)
        seconds: dict[str, list[float]] = {name: [] for name in kinds}
        for _ in range(opts.calls):
            for name, arguments in kinds.items():
                began = time.perf_counter()
                handle.call.remote(*arguments).result(timeout_s=60)
                seconds[name].append(time.perf_counter() - began)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "benchmark": "serve_roundtrip",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "payload_bytes": {name: sum(a.nbytes for a in arguments) for name, arguments in kinds.items()},
        "round_trip_ms": {
            name: {"p10": percentile(v, 0.1) * 1e3, "p50": statistics.median(v) * 1e3, "p90": percentile(v, 0.9) * 1e3}
            for name, v in seconds.items()
        },
        "samples_s": seconds,
    }
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(result, indent=1))
    for name, figures in result["round_trip_ms"].items():
        print(f"{name:10s} {result['payload_bytes'][name]:>8d} B  p10 {figures['p10']:.2f}  p50 {figures['p50']:.2f}  "
              f"p90 {figures['p90']:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
