"""Config overlays (--overlay / --set): the GPU graph with simulated models, nothing else changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.app import app_args_from_config, build_app, load_serve_config
from serve_app.cli import main
from serve_app.overlay import OverlayError, apply_overlays, deep_merge, parse_set, validate_config
from tests.serve.test_configs import deployments_of

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SIMULATED = CONFIGS / "overlays" / "simulated-cpu.yaml"


def test_deep_merge_matches_applications_by_name_and_null_removes():
    base = {"a": {"x": 1, "y": 2}, "applications": [{"name": "one", "args": {"k": 1, "j": 2}}, {"name": "two"}]}
    overlay = {"a": {"y": None, "z": 3}, "applications": [{"name": "one", "args": {"k": 5}}, {"name": "three"}]}
    merged = deep_merge(base, overlay)
    assert merged["a"] == {"x": 1, "z": 3}
    assert merged["applications"] == [{"name": "one", "args": {"k": 5, "j": 2}}, {"name": "two"}, {"name": "three"}]
    assert base["a"] == {"x": 1, "y": 2}  # inputs untouched
    with pytest.raises(OverlayError, match="needs a name"):
        deep_merge(base, {"applications": [{"args": {}}]})


def test_set_values_are_yaml_and_paths_scoped():
    assert parse_set("inpainter.model=sim://sd15?a=1&b=2") == ("inpainter.model", "sim://sd15?a=1&b=2")
    assert parse_set("x.y=0.5") == ("x.y", 0.5)
    assert parse_set("x={num_cpus: 1}") == ("x", {"num_cpus": 1})
    assert parse_set("x=null") == ("x", None)
    for bad in ("novalue", "=3", "a..b=1"):
        with pytest.raises(OverlayError, match="PATH=VALUE"):
            parse_set(bad)
    config = load_serve_config(CONFIGS / "gpu.yaml")
    result = apply_overlays(
        config,
        sets=["sam=null", "serve.http_options.port=9001", "app.runtime_env.env_vars.EXTRA='1'",
              "inpainter.deployment.autoscaling_config.upscale_delay_s=1"],
    )
    [application] = result["applications"]
    assert "sam" not in application["args"] and result["http_options"]["port"] == 9001
    assert application["runtime_env"]["env_vars"]["EXTRA"] == "1"
    assert application["args"]["inpainter"]["deployment"]["autoscaling_config"]["upscale_delay_s"] == 1
    assert config["http_options"]["port"] == 8000  # the loaded file is not modified
    with pytest.raises(OverlayError, match="detector.model is str"):
        apply_overlays(config, sets=["detector.model.x=1"])


def test_simulated_overlay_keeps_the_gpu_graph_and_swaps_only_models():
    gpu = load_serve_config(CONFIGS / "gpu.yaml")
    simulated = apply_overlays(gpu, [SIMULATED], ["inpainter.model=sim://sd15-inpainting?a=0.01"])
    validate_config(simulated)
    original, swapped = deployments_of(build_app(app_args_from_config(gpu))), deployments_of(
        build_app(app_args_from_config(simulated))
    )
    assert set(original) == set(swapped) == {"FaceDetailerIngress", "Detector", "Sam", "Inpainter", "TextEncoder"}
    for name, deployment in original.items():
        other = swapped[name]
        assert other.ray_actor_options == deployment.ray_actor_options, name
        assert other._deployment_config.autoscaling_config == deployment._deployment_config.autoscaling_config, name
        assert other.max_ongoing_requests == deployment.max_ongoing_requests, name
    # gpu.yaml's checkpoints by name become the one simulated checkpoint (named "default")
    [(name, checkpoint)] = swapped["Inpainter"].init_args[0].items()
    assert name == "default" and checkpoint["model"] == "sim://sd15-inpainting?a=0.01"
    assert {field for field, value in checkpoint.items() if value is not None} == {"model"}, checkpoint
    assert swapped["TextEncoder"].init_args == swapped["Inpainter"].init_args  # the encoders of those checkpoints
    assert swapped["Detector"].init_args[0].startswith("sim://detector")
    assert swapped["Sam"].init_args[0] == "sim://sam"
    assert {swapped[name].init_kwargs["device"] for name in ("Inpainter", "Detector", "Sam", "TextEncoder")} == {"cpu"}
    assert swapped["TextEncoder"].init_kwargs["preload"] is False
    assert app_args_from_config(simulated).limits == app_args_from_config(gpu).limits
    # gpu.yaml's key file is a Kubernetes secret: the rehearsal runs open, or with the demo keys
    assert app_args_from_config(gpu).auth is not None and app_args_from_config(simulated).auth is None
    with_keys = apply_overlays(gpu, [SIMULATED, CONFIGS / "overlays" / "auth-demo.yaml"])
    validate_config(with_keys)
    auth = app_args_from_config(with_keys).auth
    assert auth.keys_file is None and [key.id for key in auth.keys] == ["demo-detail", "demo-admin"]


def test_misspelt_paths_fail_naming_the_field(capsys):
    config = apply_overlays(load_serve_config(CONFIGS / "gpu.yaml"), sets=["inpainter.modle=x"])
    with pytest.raises(ValidationError, match="modle"):
        validate_config(config)
    with pytest.raises(SystemExit, match="modle"):
        main(["config", "--config", str(CONFIGS / "gpu.yaml"), "--set", "inpainter.modle=x"])


def test_config_command_prints_the_overlaid_config(capsys):
    main(["config", "--config", str(CONFIGS / "gpu.yaml"), "--overlay", str(SIMULATED), "--set", "sam.device=cpu"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["proxy_location"] == "HeadOnly"
    assert printed["applications"][0]["args"]["inpainter"]["model"] == "sim://sd15-inpainting"
    validate_config(printed)
