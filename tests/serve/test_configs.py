"""The Serve config files build into the intended graph, so they cannot rot.

The GPU application is built (not started: no GPU here) and every deployment's options are
checked; the CPU one is checked to fit this 2-core, GPU-less machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from ray.serve import Application

from serve_app.app import app_args_from_config, build_app, load_serve_config
from serve_app.config import AppArgs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def deployments_of(app: Application) -> dict[str, object]:
    """Walk a bound application: {deployment name: Deployment}."""
    found: dict[str, object] = {}
    pending = [app]
    while pending:
        deployment = pending.pop()._bound_deployment
        found[deployment.name] = deployment
        children = list(deployment.init_args) + list(deployment.init_kwargs.values())
        children += [value for child in children if isinstance(child, dict) for value in child.values()]
        pending.extend(child for child in children if isinstance(child, Application))
    return found


def test_gpu_config_builds_with_fractional_gpus_and_autoscaling():
    config = load_serve_config(CONFIGS / "gpu.yaml")
    [application] = config["applications"]
    assert application["import_path"] == "serve_app.app:build_app"
    app = build_app(app_args_from_config(config))
    deployments = deployments_of(app)
    assert set(deployments) == {"FaceDetailerIngress", "Detector", "Sam", "Inpainter", "TextEncoder"}
    expected_gpus = {"Detector": 0.05, "Sam": 0.1, "TextEncoder": 0.2, "Inpainter": 0.65, "FaceDetailerIngress": 0}
    for name, gpus in expected_gpus.items():
        deployment = deployments[name]
        assert deployment.ray_actor_options.get("num_gpus", 0) == pytest.approx(gpus), name
        autoscaling = deployment._deployment_config.autoscaling_config
        assert autoscaling is not None and autoscaling.max_replicas > autoscaling.min_replicas >= 1, name
    assert sum(expected_gpus.values()) <= 1.0, "one replica of each model shares one GPU"
    assert deployments["Inpainter"]._deployment_config.autoscaling_config.max_replicas == 8
    assert deployments["Inpainter"].max_queued_requests == 64
    assert deployments["Inpainter"].init_kwargs["dtype"] == "float16"
    assert deployments["Detector"].init_args[0] == "hf://Bingsu/adetailer/face_yolov8m.pt"
    assert deployments["Sam"].init_kwargs["model_type"] == "vit_b"
    assert deployments["FaceDetailerIngress"].max_ongoing_requests == 64
    # API keys on, from the mounted Kubernetes secret; the shared quota ledger beside the ingress
    ingress = deployments["FaceDetailerIngress"]
    assert ingress.init_kwargs["auth"]["keys_file"] == "/etc/facedetailer/keys/keys.yaml"
    assert ingress.init_kwargs["auth"]["keys"] == [] and ingress.init_kwargs["auth"]["fair_queueing"] is True
    [ledger] = ingress._deployment_config.deployment_actors
    assert ledger.name == "quota_ledger"
    # Flux.1 dev in fp8 from ComfyUI's folders; its text encoders in the TextEncoder deployment, which every
    # inpainter replica and the ingress (for /v1/stats) reach by handle
    [checkpoints] = deployments["Inpainter"].init_args
    flux = checkpoints["flux-dev"]
    assert flux["diffusion_model"].endswith("models/diffusion_models/flux1-dev-fp8-e4m3fn.safetensors")
    assert flux["text_encoders"]["t5xxl"].endswith("models/text_encoders/t5xxl_fp8_e4m3fn.safetensors")
    text_encoder = deployments["TextEncoder"]
    assert text_encoder.init_args[0] == checkpoints
    assert text_encoder.init_kwargs["device"] == "cuda" and text_encoder.init_kwargs["dtype"] == "float16"
    assert deployments["Inpainter"].init_kwargs["text_encoder"] is not None
    assert deployments["FaceDetailerIngress"].init_kwargs["text_encoder"] is not None


def test_local_cpu_config_fits_two_cores_without_gpu():
    config = load_serve_config(CONFIGS / "local-cpu.yaml")
    assert config["http_options"]["host"] == "127.0.0.1" and config["http_options"]["port"] == 8000
    env = config["applications"][0]["runtime_env"]["env_vars"]
    for switch in ("HF_HUB_OFFLINE", "YOLO_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert env[switch] == "1"
    assert env["YOLO_AUTOINSTALL"] == "0" and "YOLO_CONFIG_DIR" in env
    # replicas reuse freed memory instead of faulting in fresh pages per large tensor (docs/performance.md)
    assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_ARENA_MAX"] == "1"
    assert int(env["MALLOC_TRIM_THRESHOLD_"]) >= 2**32
    deployments = deployments_of(build_app(app_args_from_config(config)))
    assert set(deployments) == {"FaceDetailerIngress", "Detector", "Sam", "Inpainter", "TextEncoder"}
    total_cpus = 0.0
    for name, deployment in deployments.items():
        options = deployment.ray_actor_options
        assert options.get("num_gpus", 0) == 0, name
        assert 0 < options["num_cpus"] < 1, f"{name} must ask for a fraction of a core"
        total_cpus += options["num_cpus"] * deployment.num_replicas
    assert total_cpus <= 2.0
    assert deployments["Detector"].init_args[0] == "pkg://faceghost/model/v0-1.onnx"
    assert deployments["Sam"].init_kwargs["model_type"] == "lite_medsam"
    # open, exactly as before API keys existed: no auth argument, no ledger actor
    assert "auth" not in deployments["FaceDetailerIngress"].init_kwargs
    assert not deployments["FaceDetailerIngress"]._deployment_config.deployment_actors


def test_auth_demo_overlay_turns_keys_on_for_the_local_config_with_the_documented_demo_keys():
    from serve_app.auth.keys import KeyStore
    from serve_app.overlay import apply_overlays, validate_config

    config = apply_overlays(load_serve_config(CONFIGS / "local-cpu.yaml"), [CONFIGS / "overlays" / "auth-demo.yaml"])
    validate_config(config)
    auth = app_args_from_config(config).auth
    assert auth is not None and auth.keys_file is None
    store = KeyStore(auth.keys)
    detail, admin = store.find("demo-detail-key"), store.find("demo-admin-key")
    assert detail.scopes == ["detail"] and detail.quotas.requests_per_minute == 2
    assert admin.scopes == ["detail", "admin"] and admin.quotas.requests_per_minute is None
    ingress = deployments_of(build_app(app_args_from_config(config)))["FaceDetailerIngress"]
    assert [key["id"] for key in ingress.init_kwargs["auth"]["keys"]] == ["demo-detail", "demo-admin"]


def test_bad_app_args_name_the_field():
    with pytest.raises(ValidationError, match="num_gpus"):
        AppArgs.model_validate(
            {
                "detector": {"model": "x.pt", "deployment": {"ray_actor_options": {"num_gpus": -1}}},
                "inpainter": {"model": "y"},
            }
        )
    with pytest.raises(ValidationError, match="not both"):
        AppArgs.model_validate(
            {
                "detector": {"model": "x.pt"},
                "inpainter": {"model": "y", "deployment": {"num_replicas": 2, "autoscaling_config": {}}},
            }
        )
    with pytest.raises(ValidationError, match="unknown_option"):
        AppArgs.model_validate({"detector": {"model": "x.pt", "unknown_option": 1}, "inpainter": {"model": "y"}})


def test_named_models_build_one_deployment_each_and_reach_the_ingress_by_name():
    args = AppArgs.model_validate(
        {
            "detectors": {
                "face": "hf://Bingsu/adetailer/face_yolov8m.pt",
                "hand": {"model": "hf://Bingsu/adetailer/hand_yolov8n.pt", "imgsz": 512},
            },
            "segm_detectors": {"person": "hf://Bingsu/adetailer/person_yolov8s-seg.pt"},
            "sam_models": {"vit_b": "sam_vit_b.pth", "lite": {"checkpoint": "lite.pth", "model_type": "lite_medsam"}},
            "inpainter": {"model": "y"},
        }
    )
    app = build_app(args)
    deployments = deployments_of(app)
    assert set(deployments) == {
        "FaceDetailerIngress",
        "Detector-face",
        "Detector-hand",
        "SegmDetector-person",
        "Sam-vit_b",
        "Sam-lite",
        "Inpainter",
    }
    assert deployments["Detector-hand"].init_args[0] == "hf://Bingsu/adetailer/hand_yolov8n.pt"
    assert deployments["Detector-hand"].init_kwargs["imgsz"] == 512
    assert deployments["SegmDetector-person"].init_kwargs["task"] == "segment"
    assert deployments["Sam-lite"].init_kwargs["model_type"] == "lite_medsam"
    ingress = app._bound_deployment
    detectors = ingress.init_args[0]
    assert list(detectors) == ["face", "hand"], "configuration order: the first is the default"
    assert list(ingress.init_kwargs["sam"]) == ["vit_b", "lite"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ({"inpainter": {"model": "y"}}, "bbox detector is required"),
        ({"detector": {"model": "a"}, "detectors": {"b": "b.pt"}, "inpainter": {"model": "y"}}, "not both"),
        ({"detectors": {}, "inpainter": {"model": "y"}}, "at least one"),
        ({"detectors": {"../x": "b.pt"}, "inpainter": {"model": "y"}}, "must match"),
        (
            {
                "detectors": {"a": "a.pt"},
                "sam": {"checkpoint": "s"},
                "sam_models": {"b": "b"},
                "inpainter": {"model": "y"},
            },
            "not both",
        ),
    ],
)
def test_named_model_config_errors(args, needle):
    with pytest.raises(ValidationError, match=needle):
        AppArgs.model_validate(args)


def test_checkpoint_layouts_and_overrides_are_checked():
    from serve_app.config import CheckpointArgs

    split = CheckpointArgs(diffusion_model="unet/flux1-dev.safetensors", text_encoders={"t5xxl": "t5.safetensors"},
                           vae="ae.safetensors", family="flux", shift=1.5)  # fmt: skip
    assert split.model is None and split.text_encoders == {"t5xxl": "t5.safetensors"}
    assert CheckpointArgs(model="a.safetensors", precision="bf16").precision == "bf16"
    refused = [
        ({"model": "a.safetensors", "diffusion_model": "b.safetensors"}, "model .* or diffusion_model"),
        ({}, "model .* or diffusion_model"),
        ({"model": "a.safetensors", "vae": "ae.safetensors"}, "belong to the split layout"),
        ({"model": "flux", "family": "flux", "prediction": "v_prediction"}, "SD/SDXL settings"),
        ({"model": "sd", "family": "sdxl", "shift": 3.0}, "SD3/Flux setting"),
        ({"diffusion_model": "x", "text_encoders": {"clip_h": "y"}}, "clip_h"),
        ({"model": "x", "family": "pixart"}, "family"),
        ({"model": "x", "precision": "int8"}, "precision"),
    ]
    for values, message in refused:
        with pytest.raises(ValidationError, match=message):
            CheckpointArgs.model_validate(values)
