"""deploy/kuberay/rayservice.yaml serves exactly configs/gpu.yaml, on a cluster that can hold it."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from serve_app.app import app_args_from_config, load_serve_config
from serve_app.overlay import validate_config

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"


def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def test_serve_config_v2_is_exactly_the_gpu_config_and_both_validate():
    service = manifest()
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    gpu = load_serve_config(REPO / "configs" / "gpu.yaml")
    assert serve_config["applications"] == gpu["applications"]
    assert serve_config == gpu
    for config in (serve_config, gpu):
        validate_config(config)  # Ray's ServeDeploySchema and the project's AppArgs


def test_cluster_has_a_head_and_an_autoscaled_gpu_group_with_health_readiness():
    cluster = manifest()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    [gpu_group] = [group for group in cluster["workerGroupSpecs"] if group["groupName"] == "gpu"]
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    for container in (head, worker):
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
        assert container["image"] == head["image"]
    assert {"name": "RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY", "value": "1"} in head["env"]
    # Each 1-GPU node holds one inpainter (0.7 GPU): the group must be able to grow to its max_replicas.
    args = app_args_from_config(yaml.safe_load(manifest()["spec"]["serveConfigV2"]))
    inpainter = args.inpainter.deployment
    per_node = math.floor(1 / inpainter.ray_actor_options.num_gpus)
    assert gpu_group["maxReplicas"] * per_node >= inpainter.autoscaling_config.max_replicas
    assert gpu_group["minReplicas"] >= 1
    assert {"name": "model-cache", "mountPath": "/models"} in worker["volumeMounts"]


def test_the_key_file_of_gpu_yaml_comes_from_a_secret_mounted_on_every_node_that_can_run_the_ingress():
    args = app_args_from_config(yaml.safe_load(manifest()["spec"]["serveConfigV2"]))
    assert args.auth is not None and args.auth.keys_file is not None
    key_dir = str(Path(args.auth.keys_file).parent)
    cluster = manifest()["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for pod in pods:
        [container] = pod["containers"]
        [mount] = [mount for mount in container["volumeMounts"] if mount["mountPath"] == key_dir]
        assert mount.get("readOnly") is True and "subPath" not in mount, "a subPath mount never sees an update"
        [volume] = [volume for volume in pod["volumes"] if volume["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "facedetailer-api-keys"
        # Ray's metrics port is not published by the pods (API keys guard the app's routes only)
        assert 8080 not in {port["containerPort"] for port in container.get("ports", [])}
