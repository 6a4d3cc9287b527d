"""The application builder: binds the model deployments into the ingress (Ray Serve's pattern).

``serve run configs/local-cpu.yaml`` imports :func:`build_app` and passes the file's ``args``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve import Application

from deployments.engine_stats import deployment_actor_config
from deployments.serving import DetectorDeployment, InpainterDeployment, SamDeployment, TextEncoderDeployment
from serve_app.auth import ledger_actor_config
from serve_app.config import AppArgs, DeploymentOptions, DetectorArgs, SamArgs
from serve_app.ingress import FaceDetailerIngress
from serve_app.model_choice import DEFAULT_NAME

APP_NAME = "facedetailer"


def _model_deployment(cls: type, name: str, options: DeploymentOptions) -> serve.Deployment:
    return serve.deployment(cls, name=name).options(**options.to_serve_options())


def _named_deployments(
    cls: type, base_name: str, models: dict[str, Any], bind: Callable[[serve.Deployment, Any], Application]
) -> Application | dict[str, Application] | None:
    """One deployment per configured model: ``base_name`` for the lone ``default`` model (the
    single config form), ``base_name-<name>`` for each named one; None when none is configured.
    """
    if not models:
        return None
    if list(models) == [DEFAULT_NAME]:
        args = models[DEFAULT_NAME]
        return bind(_model_deployment(cls, base_name, args.deployment), args)
    return {
        name: bind(_model_deployment(cls, f"{base_name}-{name}", args.deployment), args)
        for name, args in models.items()
    }


def _detector_binder(default_task: str | None) -> Callable[[serve.Deployment, DetectorArgs], Application]:
    def bind(deployment: serve.Deployment, detector: DetectorArgs) -> Application:
        task = detector.task or default_task
        return deployment.bind(detector.model, task=task, imgsz=detector.imgsz, device=detector.device)

    return bind


def _bind_sam(deployment: serve.Deployment, sam: SamArgs) -> Application:
    return deployment.bind(sam.checkpoint, model_type=sam.model_type, device=sam.device)


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """Bind Detector(s), (SegmDetector(s)), (Sam(s)) and Inpainter into the ingress, each with its own options."""
    config = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    detector = _named_deployments(DetectorDeployment, "Detector", config.named_detectors(), _detector_binder(None))
    segm_detector = _named_deployments(
        DetectorDeployment, "SegmDetector", config.named_segm_detectors(), _detector_binder("segment")
    )
    sam = _named_deployments(SamDeployment, "Sam", config.named_sam_models(), _bind_sam)
    paint = config.inpainter
    inpainter_deployment = _model_deployment(InpainterDeployment, "Inpainter", paint.deployment)
    # the engine's statistics are summed over replicas by a deployment-scoped actor
    inpainter_deployment = inpainter_deployment.options(deployment_actors=[deployment_actor_config()])
    if paint.deployment.user_config is None:
        # live-tunable engine bounds: a Serve config's deployments[].user_config overrides them in place
        inpainter_deployment = inpainter_deployment.options(
            user_config={"max_batch_size": paint.max_batch_size, "max_queued_crops": paint.max_queued_crops}
        )
    checkpoints = {name: spec.model_dump() for name, spec in paint.named_checkpoints().items()}
    text_encoder = None
    if config.text_encoder is not None:  # SD3/Flux text encoders in their own deployment, shared by the inpainters
        text = config.text_encoder
        text_encoder = _model_deployment(TextEncoderDeployment, "TextEncoder", text.deployment).bind(
            checkpoints,
            device=text.device or paint.device,
            dtype=text.dtype or paint.dtype,
            cache_max_entries=text.cache_max_entries,
            cache_max_bytes=text.cache_max_bytes,
            preload=text.preload,
        )
    inpainter = inpainter_deployment.bind(
        checkpoints,
        max_models_per_replica=paint.max_models_per_replica,
        device=paint.device,
        dtype=paint.dtype,
        lora_dir=paint.lora_dir,
        max_batch_size=paint.max_batch_size,
        max_queued_crops=paint.max_queued_crops,
        controlnets={name: spec.model_dump() for name, spec in (config.controlnets or {}).items()},
        text_encoder=text_encoder,
    )
    ingress = FaceDetailerIngress.options(**config.ingress.to_serve_options())
    if config.auth is not None:
        # the keys' quota ledger, shared by every ingress replica: a deployment-scoped actor
        ingress = ingress.options(deployment_actors=[ledger_actor_config()])
    return ingress.bind(
        detector,
        inpainter,
        sam=sam,
        segm_detector=segm_detector,
        limits=config.limits.model_dump(),
        wildcards_dir=config.wildcards_dir,
        checkpoints=list(checkpoints),
        text_encoder=text_encoder,
        controlnets={name: spec.preprocessor for name, spec in (config.controlnets or {}).items()},
        **({"auth": config.auth.model_dump()} if config.auth is not None else {}),  # without: exactly as before
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
