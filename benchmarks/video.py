"""Video figures for docs/video.md: flicker per temporal mode, frames/s on CPU and on ``sim://``.

The clip is the tests' synthetic one (deployments/testing/video_clip.py: the astronaut and Zidane
moving and growing, real faces for the real face detector), longer by default. Three parts:

1. **CPU, tiny SD** (random weights), in-process: each temporal mode (``frames`` = FaceDetailer
   frame by frame, ``tracks``, ``shared_noise``) — flicker ratio on common face regions (the
   tracks' smoothed boxes) and on each mode's own regions, wall time, frames/s.
2. **``sim://sd15-inpainting``** (the simulated A100 of docs/simulated.md), in-process: frames/s
   of the sampling stage with one frame per inpainter call (no cross-frame batching) and with
   ``segment_frames`` frames per call, and the engine's mean UNet batch.
3. **``sim://`` over Ray Serve with R inpainter replicas**: the video cut into segments that run
   concurrently (``video_parallel_segments = R``): frames/s of the sampling stage, and whether the
   result equals the one-replica run.

Run under the heavy lock on a quiet machine:
    flock /tmp/fd-heavy.lock python -m benchmarks.video --out benchmarks/video.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from deployments.detector import FaceDetector
from deployments.inpainter import Inpainter, RefineJob
from deployments.model_loading import load_inpainter
from deployments.testing import assets
from deployments.testing.video_clip import ClipSpec, clip_frames, encode_clip
from facedetailer.flicker import box_masks, flicker_ratio
from facedetailer.params import FaceDetailerParams
from facedetailer.video_params import VideoParams
from serve_app.config import Limits
from serve_app.ingress import sampling_settings
from serve_app.local import LocalStages
from serve_app.video.codec import decode_video
from serve_app.video.service import detail_video_file

# (label, temporal, latent_blend)
MODES = (("frames", "frames", 0.0), ("tracks", "tracks", 0.0), ("shared_noise", "shared_noise", 0.0),
         ("shared_noise+latent_blend=0.5", "shared_noise", 0.5))  # fmt: skip
SIM_MODEL = "sim://sd15-inpainting"


def _load() -> dict[str, float]:
    one, five, _ = os.getloadavg()
    return {"load1": round(one, 2), "load5": round(five, 2)}


def cpu_modes(clip: bytes, params: FaceDetailerParams, tiny_sd: str, detector: FaceDetector) -> dict[str, Any]:
    stages = LocalStages(detector, Inpainter(tiny_sd, device="cpu"))
    source = decode_video(clip).frames
    results: dict[str, Any] = {}
    runs = {}
    for mode, temporal, blend in MODES:
        started = time.perf_counter()
        video = VideoParams(temporal=temporal, latent_blend=blend)
        response = stages.detail_video(clip, params, video, keep_result=True)
        seconds = time.perf_counter() - started
        runs[mode] = response
        results[mode] = {
            "flicker_own_regions": round(response.flicker, 3),
            "seconds": round(seconds, 2),
            "frames_per_s": round(response.frames / seconds, 3),
            "refine_frames_per_s": round(response.frames / response.timings["refine"], 3),
            "faces_refined": response.faces_refined,
            "timings": {k: round(v, 3) for k, v in response.timings.items()},
        }
        print(f"cpu {mode}: {results[mode]}", flush=True)
    common = box_masks(source[0].shape[:2], runs["shared_noise"].result.face_boxes)
    for mode, _, _ in MODES:
        results[mode]["flicker"] = round(flicker_ratio(source, runs[mode].result.frames, common), 3)
    return results


def sim_batching(clip: bytes, params: FaceDetailerParams, detector: FaceDetector, segment_frames: int) -> dict:
    results = {}
    for frames_per_call in (1, segment_frames):
        inpainter = load_inpainter(SIM_MODEL, device="cpu", max_batch_size=8)
        stages = LocalStages(detector, inpainter)
        video = VideoParams(temporal="shared_noise", segment_frames=frames_per_call)
        response = stages.detail_video(clip, params, video)
        sizes = inpainter.engine.snapshot()["unet_batch_sizes"]
        calls = sum(sizes.values())
        mean_batch = sum(int(size) * count for size, count in sizes.items()) / calls if calls else 0.0
        results[f"{frames_per_call}_frames_per_call"] = {
            "refine_frames_per_s": round(response.frames / response.timings["refine"], 2),
            "refine_s": round(response.timings["refine"], 3),
            "unet_calls": calls,
            "mean_unet_batch": round(mean_batch, 2),
        }
        print(f"sim {frames_per_call} frames/call: {results[f'{frames_per_call}_frames_per_call']}", flush=True)
    return results


class _RayStages:
    """Detection in this process, sampling on the inpainter deployment's replicas."""

    def __init__(self, detector: FaceDetector, handle: Any) -> None:
        self.detector, self.handle = detector, handle

    async def detect(self, image: np.ndarray, threshold: float) -> Any:
        return self.detector.detect(image, threshold)

    async def detect_segm(self, image: np.ndarray, threshold: float) -> Any:
        raise NotImplementedError

    async def segment(self, image: np.ndarray, prompts: Any) -> Any:
        raise NotImplementedError

    async def refine(self, jobs: Any, settings: Any) -> Any:
        return await self.handle.refine.remote(list(jobs), settings)


def sim_replicas(clip: bytes, params: FaceDetailerParams, detector: FaceDetector, replicas: list[int],
                 segment_frames: int) -> dict:  # fmt: skip
    import ray
    from ray import serve

    from deployments.serving import InpainterDeployment

    results: dict[str, Any] = {}
    reference = None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for count in replicas:
            deployment = serve.deployment(InpainterDeployment, name="Inpainter").options(
                num_replicas=count, ray_actor_options={"num_cpus": 0.1, "num_gpus": 0}, max_ongoing_requests=16
            )
            handle = serve.run(deployment.bind(SIM_MODEL, device="cpu", max_queued_crops=512), name="video-bench",
                               route_prefix=None)  # fmt: skip
            stages = _RayStages(detector, handle)
            limits = Limits(video_parallel_segments=count)
            video = VideoParams(temporal="shared_noise", segment_frames=segment_frames)
            response = asyncio.run(
                detail_video_file(clip, params, video, stages, limits, make_job=RefineJob,
                                  settings=sampling_settings(params), keep_result=True)  # fmt: skip
            )
            frames = response.result.frames
            if reference is None:
                reference = frames
            pairs = zip(reference, frames, strict=True)
            difference = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in pairs)
            results[f"{count}_replicas"] = {
                "refine_frames_per_s": round(response.frames / response.timings["refine"], 2),
                "refine_s": round(response.timings["refine"], 3),
                "segments": response.segments,
                "max_level_difference_vs_1_replica": difference,
            }
            print(f"sim ray {count} replicas: {results[f'{count}_replicas']}", flush=True)
            serve.delete("video-bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--segment-frames", type=int, default=8)
    parser.add_argument("--replicas", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from deployments.testing.build_tiny_models import build_component, default_tiny_models_dir

    tiny_sd = build_component("sd", default_tiny_models_dir() / "sd")["pipeline"]
    spec = ClipSpec(frames=args.frames)
    clip = encode_clip(clip_frames(spec), spec)
    params = FaceDetailerParams(steps=args.steps, guide_size=128, max_size=512, seed=3)
    detector = FaceDetector(str(assets.faceghost_face_onnx()), task="detect", device="cpu")
    report: dict[str, Any] = {
        "clip": {"frames": spec.frames, "size": [spec.width, spec.height], "fps": str(spec.fps), "faces": 2},
        "params": params.model_dump(include={"steps", "guide_size", "max_size", "seed", "denoise", "cfg"}),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": _load()},
    }
    if not args.skip_cpu:
        report["cpu_tiny_sd"] = cpu_modes(clip, params, tiny_sd, detector)
    report["sim_batching"] = sim_batching(clip, params, detector, args.segment_frames)
    report["sim_replicas"] = sim_replicas(clip, params, detector, args.replicas, args.segment_frames)
    report["machine"]["load_after"] = _load()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
