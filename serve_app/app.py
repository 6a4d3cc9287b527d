"""The application builder: binds the model deployments into the ingress (Ray Serve's pattern).

``serve run configs/local-cpu.yaml`` imports :func:`build_app` and passes the file's ``args``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve import Application

from deployments.engine_stats import deployment_actor_config
from deployments.serving import DetectorDeployment, InpainterDeployment, SamDeployment
from serve_app.config import AppArgs, DeploymentOptions
from serve_app.ingress import FaceDetailerIngress

APP_NAME = "facedetailer"


def _model_deployment(cls: type, name: str, options: DeploymentOptions) -> serve.Deployment:
    return serve.deployment(cls, name=name).options(**options.to_serve_options())


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """Bind Detector, (SegmDetector), (Sam) and Inpainter into the ingress, each with its own options."""
    config = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    detector = _model_deployment(DetectorDeployment, "Detector", config.detector.deployment).bind(
        config.detector.model, task=config.detector.task, imgsz=config.detector.imgsz, device=config.detector.device
    )
    segm_detector = None
    if config.segm_detector is not None:
        segm = config.segm_detector
        segm_detector = _model_deployment(DetectorDeployment, "SegmDetector", segm.deployment).bind(
            segm.model, task=segm.task or "segment", imgsz=segm.imgsz, device=segm.device
        )
    sam = None
    if config.sam is not None:
        sam = _model_deployment(SamDeployment, "Sam", config.sam.deployment).bind(
            config.sam.checkpoint, model_type=config.sam.model_type, device=config.sam.device
        )
    paint = config.inpainter
    inpainter_deployment = _model_deployment(InpainterDeployment, "Inpainter", paint.deployment)
    # the engine's statistics are summed over replicas by a deployment-scoped actor
    inpainter_deployment = inpainter_deployment.options(deployment_actors=[deployment_actor_config()])
    if paint.deployment.user_config is None:
        # live-tunable engine bounds: a Serve config's deployments[].user_config overrides them in place
        inpainter_deployment = inpainter_deployment.options(
            user_config={"max_batch_size": paint.max_batch_size, "max_queued_crops": paint.max_queued_crops}
        )
    inpainter = inpainter_deployment.bind(
        paint.model,
        single_file_config=paint.single_file_config,
        device=paint.device,
        dtype=paint.dtype,
        lora_dir=paint.lora_dir,
        max_batch_size=paint.max_batch_size,
        max_queued_crops=paint.max_queued_crops,
    )
    ingress = FaceDetailerIngress.options(**config.ingress.to_serve_options())
    return ingress.bind(
        detector, inpainter, sam=sam, segm_detector=segm_detector, limits=config.limits.model_dump()
    )


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read a Serve config file (the format ``serve run``/``serve deploy`` take)."""
    with open(path) as handle:
        return yaml.safe_load(handle)


def app_args_from_config(config: dict[str, Any], app_name: str = APP_NAME) -> AppArgs:
    """The validated ``args`` of one application in a Serve config."""
    for application in config.get("applications", []):
        if application.get("name") == app_name:
            return AppArgs.model_validate(application.get("args", {}))
    raise KeyError(f"no application named {app_name!r} in the config")
