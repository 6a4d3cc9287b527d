"""One Ray instance per test session, the local CPU application served once, shut down at the end."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
APP_NAME = "facedetailer"
SEGM_APP_NAME = "facedetailer-segm"
SEGM_ROUTE = "/segm"
# Smaller than the shipped limits so that the oversize requests the tests send stay small.
TEST_LIMITS = {
    "max_upload_bytes": 3_000_000,
    "max_image_pixels": 4096 * 4096,
    "max_batch_images": 4,
    "max_video_frames": 40,
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def local_cpu_config() -> dict[str, Any]:
    from serve_app.app import load_serve_config

    return load_serve_config(CONFIGS / "local-cpu.yaml")


@pytest.fixture(scope="session")
def serve_instance(
    local_cpu_config: dict[str, Any], tiny_sd: dict, tiny_yolo: dict, tiny_controlnet: dict
) -> Iterator[dict[str, Any]]:
    """Ray (2 CPUs) with the local-cpu.yaml app on a free port and a second app with a segm detector."""
    import ray
    from ray import serve

    from serve_app.app import app_args_from_config, build_app
    from serve_app.config import AppArgs

    [application] = local_cpu_config["applications"]
    env_vars = {key: str(value) for key, value in application["runtime_env"]["env_vars"].items()}
    # The replicas inherit the test process' offline switches and blocked proxies as well.
    env_vars.update({key: value for key, value in os.environ.items() if key.endswith(("_OFFLINE", "_PROXY", "_proxy"))})
    env_vars["FACEDETAILER_TINY_MODELS"] = os.environ["FACEDETAILER_TINY_MODELS"]
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env_vars}, log_to_driver=False)
    try:
        port = _free_port()
        http = dict(local_cpu_config["http_options"], port=port)
        serve.start(http_options=http)
        args = app_args_from_config(local_cpu_config).model_copy(deep=True)
        args.limits = args.limits.model_validate(TEST_LIMITS)
        handle = serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        # A second, lighter app: the faceghost detector plus the tiny YOLO *segm* model, so the
        # segm path runs through the served graph too.
        light = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1, "num_gpus": 0}}
        # It also serves two bbox detectors by name: "face" (the default) and the tiny random
        # YOLO "tiny", which finds no face, so a request shows which one it used.
        segm_values = args.model_dump()
        face = dict(segm_values.pop("detector"), deployment=light)
        tiny = {"model": tiny_yolo["bbox"], "task": "detect", "device": "cpu", "deployment": light}
        segm_values.update(
            detectors={"face": face, "tiny": tiny},
            sam=None,
            segm_detector={"model": tiny_yolo["segm"], "task": "segment", "device": "cpu", "deployment": light},
            ingress=light,
        )
        segm_values["inpainter"]["deployment"] = light
        # Its inpainter serves an SD 1.x and an SDXL checkpoint (the tiny SDXL end to end over HTTP).
        segm_values["inpainter"].update(
            model=None, checkpoints={"sd15": tiny_sd["pipeline"], "sdxl": tiny_sd["sdxl_pipeline"]}
        )
        segm_args = AppArgs.model_validate(segm_values)
        segm_handle = serve.run(build_app(segm_args), name=SEGM_APP_NAME, route_prefix=SEGM_ROUTE)
        yield {
            "url": f"http://127.0.0.1:{port}",
            "handle": handle,
            "segm_handle": segm_handle,
            "startup_s": time.perf_counter() - started,
        }
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
