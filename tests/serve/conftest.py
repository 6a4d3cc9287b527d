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
    local_cpu_config: dict[str, Any],
    tiny_sd: dict,
    tiny_yolo: dict,
    tiny_controlnet: dict,
    tiny_sdxl_vpred: dict,
    tiny_sd3: dict,
    tiny_flux_dev: dict,
    tiny_flux_fill: dict,
) -> Iterator[dict[str, Any]]:
    """Ray (2 CPUs) with the local-cpu.yaml app on a free port and a second app with a segm detector.

    Every tiny checkpoint local-cpu.yaml serves (one per model family) is built here first, so no
    replica builds one while it answers a request.
    """
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
    # address="local": always a private instance (without it ray.init joins a cluster another process on
    # this machine started, e.g. tests/cluster's, and fails on num_cpus)
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env_vars}, log_to_driver=False
    )
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
        segm_values["text_encoder"] = None  # SD checkpoints only: their CLIP encoders stay in the inpainter
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


AUTH_APP_NAME = "facedetailer-auth"
AUTH_ROUTE = "/auth"
# The keys of the auth app (tests/serve/test_auth_http.py): {id: (scopes, quotas)}.
AUTH_KEYS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "open": (["detail"], {}),
    "admin": (["detail", "admin"], {}),
    "rpm": (["detail"], {"requests_per_minute": 2}),
    "crops": (["detail"], {"concurrent_crops": 4}),
    "units": (["detail"], {"work_units_per_hour": 3}),
    "rotate": (["detail"], {}),
    "video": (["detail"], {"requests_per_minute": 100, "work_units_per_hour": 1000}),  # metered, never refused
}


@pytest.fixture(scope="module")
def auth_instance(
    serve_instance: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A third, light app with API keys on, at ``/auth`` in the session's Ray: ``sim://`` models
    (docs/simulated.md: no weights, each UNet call sleeps 50 ms), two ingress replicas sharing the
    quota ledger, keys in a key file (re-read every 0.5 s) whose plain values the fixture returns.
    0.01 CPU each: the local config (with its text encoder) and the segm app hold 1.85 of the 2 CPUs."""
    import yaml
    from ray import serve

    from serve_app.app import build_app
    from serve_app.auth.keys import key_entry, new_key

    keys = {key_id: new_key() for key_id in AUTH_KEYS}
    keys_file = tmp_path_factory.mktemp("auth") / "keys.yaml"
    entries = [key_entry(key_id, keys[key_id], scopes, quotas=quotas) for key_id, (scopes, quotas) in AUTH_KEYS.items()]
    keys_file.write_text(yaml.safe_dump({"keys": entries}))
    light = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.01, "num_gpus": 0}}
    args = {
        "detector": {"model": "sim://detector?faces=4", "device": "cpu", "deployment": light},
        "inpainter": {
            "model": "sim://sd15-inpainting?a=0.05&b=0",
            "device": "cpu",
            "dtype": "float32",
            # one crop at a time and a short queue: long requests and a full queue (503) are cheap to make
            "max_batch_size": 1,
            "max_queued_crops": 4,
            "deployment": {**light, "max_ongoing_requests": 16},
        },
        "ingress": {**light, "num_replicas": 2},
        "limits": {"request_timeout_s": 6},
        "auth": {"keys_file": str(keys_file), "reload_interval_s": 0.5},
    }
    serve.run(build_app(args), name=AUTH_APP_NAME, route_prefix=AUTH_ROUTE)
    try:
        yield {"url": serve_instance["url"] + AUTH_ROUTE, "keys": keys, "keys_file": keys_file}
    finally:  # its CPUs go back to the session: later modules deploy apps of their own
        serve.delete(AUTH_APP_NAME)
