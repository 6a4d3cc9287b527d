"""Typed application arguments: what each deployment loads and how it is scheduled.

A Serve config file (``configs/*.yaml``) passes these as ``args`` to :func:`serve_app.app.build_app`;
validation errors name the offending field before anything is scheduled.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingConfig(StrictModel):
    """The subset of Ray Serve's autoscaling options we set per deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)

    @model_validator(mode="after")
    def _replica_bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling: max_replicas must be >= min_replicas")
        return self


class RayActorOptions(StrictModel):
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes reserved for the replica")
    runtime_env: dict[str, Any] | None = None


class DeploymentOptions(StrictModel):
    """Scheduling options for one deployment; each scales on its own."""

    num_replicas: int | None = Field(None, ge=1, description="fixed count; omit to autoscale")
    autoscaling_config: AutoscalingConfig | None = None
    ray_actor_options: RayActorOptions = RayActorOptions()
    max_ongoing_requests: int = Field(4, ge=1)
    max_queued_requests: int = Field(-1, ge=-1, description="-1 = unbounded")
    health_check_period_s: float = Field(10.0, gt=0)
    health_check_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    user_config: dict[str, Any] | None = Field(None, description="live-updatable settings (reconfigure)")

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self

    def to_serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        options = self.model_dump(exclude_none=True, exclude={"ray_actor_options", "autoscaling_config"})
        options["ray_actor_options"] = self.ray_actor_options.model_dump(exclude_none=True)
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        elif self.num_replicas is None:
            options["num_replicas"] = 1
        return options


class DetectorArgs(StrictModel):
    model: str = Field(description="path, hf://owner/repo/file, URL or pkg:// reference")
    task: Literal["detect", "segment"] | None = None
    imgsz: int = Field(640, ge=32, le=4096)
    device: str | None = None
    deployment: DeploymentOptions = DeploymentOptions()


class SamArgs(StrictModel):
    checkpoint: str
    model_type: str = "vit_b"
    device: str | None = None
    deployment: DeploymentOptions = DeploymentOptions()


class InpainterArgs(StrictModel):
    model: str = Field(description="diffusers folder or HF id, or a single .safetensors/.ckpt file")
    single_file_config: str | None = None
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    lora_dir: str | None = None
    max_batch_size: int = Field(
        8, ge=1, le=64, description="crops sampled at once by a replica's engine (its active set; UNet batch bound)"
    )
    max_queued_crops: int = Field(
        64, ge=1, le=100000, description="crops waiting for the engine per replica; beyond it requests get 503"
    )
    deployment: DeploymentOptions = DeploymentOptions()


class Limits(StrictModel):
    """Request limits the ingress enforces before any model work (HTTP 413 / 422)."""

    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    max_batch_images: int = Field(8, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    max_inflight_requests: int = Field(
        64, ge=1, description="per ingress replica; beyond it /v1/detail answers 429 with Retry-After"
    )


class AppArgs(StrictModel):
    """Everything :func:`serve_app.app.build_app` needs."""

    detector: DetectorArgs
    segm_detector: DetectorArgs | None = None
    sam: SamArgs | None = None
    inpainter: InpainterArgs
    ingress: DeploymentOptions = DeploymentOptions(max_ongoing_requests=16)
    limits: Limits = Limits()
