"""Typed application arguments: what each deployment loads and how it is scheduled.

A Serve config file (``configs/*.yaml``) passes these as ``args`` to :func:`serve_app.app.build_app`;
validation errors name the offending field before anything is scheduled.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.model_choice import DEFAULT_NAME, NAME_PATTERN

# A stopping replica's drain: the request deadline plus this (uploads read, results encoded around it).
DRAIN_MARGIN_S = 30.0


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
    look_back_period_s: float | None = Field(None, gt=0, description="window the load is averaged over (Serve: 30)")
    metrics_interval_s: float | None = Field(None, gt=0, description="how often replicas report load (Serve: 10)")

    @model_validator(mode="after")
    def _replica_bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling: max_replicas must be >= min_replicas")
        return self


class RayActorOptions(StrictModel):
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes reserved for the replica")
    resources: dict[str, float] | None = Field(None, description="custom Ray resources, e.g. to pin to a node group")
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
    graceful_shutdown_timeout_s: float | None = Field(
        None,
        ge=0,
        description=(
            "how long a stopping replica (downscale, redeploy) may finish the requests it accepted before "
            "it is killed; default: limits.request_timeout_s + 30 (no request outlives its deadline)"
        ),
    )
    graceful_shutdown_wait_loop_s: float = Field(
        2.0, gt=0, description="how often a stopping replica checks whether its requests have finished"
    )
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


class CheckpointArgs(StrictModel):
    """One checkpoint of ``inpainter.checkpoints``: a folder or single file, or ComfyUI's split layout.

    The family (sd, sdxl, sd3, flux) is detected from the weights' keys as ComfyUI does; the
    settings below override what the files say (docs/models.md).
    """

    model: str | None = Field(
        None, description="diffusers folder or HF id, or one all-in-one .safetensors/.ckpt file"
    )
    single_file_config: str | None = Field(
        None,
        description="a diffusers folder (or cached HF id) of the same architecture: the component configs and "
        "tokenizers a single file or the split layout does not carry (its weights are not read)",
    )
    diffusion_model: str | None = Field(
        None, description="split layout: the diffusion model file (ComfyUI's models/unet or models/diffusion_models)"
    )
    text_encoders: dict[Literal["clip_l", "clip_g", "t5xxl"], str] | None = Field(
        None, description="split layout: text encoder files by kind (ComfyUI's models/text_encoders)"
    )
    vae: str | None = Field(None, description="split layout: the VAE file (ComfyUI's models/vae)")
    family: Literal["sd", "sdxl", "sd3", "flux"] | None = Field(
        None, description="override the family detected from the weights"
    )
    prediction: Literal["eps", "v_prediction"] | None = Field(
        None, description="SD/SDXL: the model's prediction type (v-prediction finetunes often don't say it)"
    )
    zsnr: bool | None = Field(None, description="SD/SDXL: zero terminal SNR (rescaled sigma table)")
    shift: float | None = Field(None, gt=0, le=100, description="SD3/Flux: the model sampling's shift")
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(
        None,
        description="opt-in run precision of this checkpoint's models (overrides inpainter.dtype): bf16 uses the "
        "CPU's bfloat16 units, fp16 is for GPUs; changes pixels (docs/performance.md). Default: inpainter.dtype",
    )

    @model_validator(mode="after")
    def _one_layout(self) -> CheckpointArgs:
        if (self.model is None) == (self.diffusion_model is None):
            raise ValueError("a checkpoint sets model (folder or single file) or diffusion_model (split layout)")
        if self.model is not None and (self.text_encoders or self.vae):
            raise ValueError("text_encoders and vae belong to the split layout (diffusion_model), not to model")
        if self.family in ("sd3", "flux") and (self.prediction is not None or self.zsnr is not None):
            raise ValueError(f"prediction and zsnr are SD/SDXL settings; {self.family} is a rectified-flow model")
        if self.family in ("sd", "sdxl") and self.shift is not None:
            raise ValueError(f"shift is an SD3/Flux setting; {self.family} uses a discrete sigma table")
        return self


class InpainterArgs(StrictModel):
    """The inpainter deployment: one checkpoint (``model``) or several by name (``checkpoints``).

    With ``checkpoints`` a request picks one with ``model`` (the node's input name; the first is
    the default) and Ray Serve's model multiplexing routes it to a replica that has it loaded;
    a replica keeps ``max_models_per_replica`` of them and evicts the least recently used. After
    validation ``model``/``single_file_config`` describe the default checkpoint in both forms.
    """

    model: str | None = Field(None, description="diffusers folder or HF id, or a single .safetensors/.ckpt file")
    single_file_config: str | None = None
    checkpoints: dict[str, CheckpointArgs] | None = Field(
        None, description="checkpoints by name; the first is the default"
    )
    max_models_per_replica: int = Field(
        2, ge=1, le=64, description="checkpoints one replica keeps loaded (LRU eviction beyond)"
    )
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

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _checkpoint_reference_shorthand(cls, value: Any) -> Any:
        return _shorthand(value, "model")

    @model_validator(mode="after")
    def _one_form(self) -> InpainterArgs:
        if self.checkpoints is None:
            if self.model is None:
                raise ValueError("inpainter: set model (one checkpoint) or checkpoints (by name)")
            return self
        if not self.checkpoints:
            raise ValueError("inpainter.checkpoints: name at least one checkpoint")
        for name in self.checkpoints:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"inpainter.checkpoints: name {name!r} must match {NAME_PATTERN}")
        first = next(iter(self.checkpoints.values()))
        if self.model is not None and (self.model, self.single_file_config) != (first.model, first.single_file_config):
            raise ValueError("inpainter: set either model or checkpoints, not both")
        self.model, self.single_file_config = first.model, first.single_file_config
        return self

    def named_checkpoints(self) -> dict[str, CheckpointArgs]:
        """``{name: checkpoint}``; the single ``model`` form is the one checkpoint named ``default``."""
        if self.checkpoints is not None:
            return self.checkpoints
        assert self.model is not None  # the validator requires one of the two forms
        return {DEFAULT_NAME: CheckpointArgs(model=self.model, single_file_config=self.single_file_config)}


class TextEncoderArgs(StrictModel):
    """The shared text encoder of SD3/Flux checkpoints: its own deployment, one copy of T5 for all inpainters.

    With it, the inpainter loads an SD3/Flux checkpoint without its text encoders and asks this
    deployment for each prompt's conditioning (cached, LRU; hits and misses in ``/v1/stats``).
    SD 1.x/2.x/XL keep their CLIP encoders in the inpainter (LoRAs patch them).
    """

    device: str | None = Field(None, description="default: the inpainter's")
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="default: the inpainter's (then the conditioning is bit-identical to local encoding)"
    )
    cache_max_entries: int = Field(1024, ge=0, description="prompts kept (0: no cache)")
    cache_max_bytes: int = Field(512 * 1024 * 1024, ge=0, description="bytes of embeddings kept")
    preload: bool = Field(False, description="load every SD3/Flux checkpoint's encoders at start, not on first use")
    deployment: DeploymentOptions = DeploymentOptions()


class ControlNetArgs(StrictModel):
    """One ControlNet the inpainter serves (loaded on every inpainter replica)."""

    model: str = Field(description="diffusers ControlNet folder or HF id, or a single .safetensors file")
    preprocessor: Literal["tile", "control_image"] = Field(
        "tile",
        description="tile: the upscaled face crop is the control image; control_image: the request sends one",
    )
    single_file_config: str | None = Field(None, description="a diffusers ControlNet config, for a single file offline")


class Limits(StrictModel):
    """Request limits the ingress enforces before any model work (HTTP 413 / 422).

    The work limits (``max_steps`` … ``max_prompt_chars``) are explained in :mod:`serve_app.limits`.
    """

    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64)
    max_batch_images: int = Field(8, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    max_inflight_requests: int = Field(
        64, ge=1, description="per ingress replica; beyond it /v1/detail answers 429 with Retry-After"
    )
    replica_loss_retries: int = Field(
        3,
        ge=0,
        le=20,
        description=(
            "a model call whose replica dies is sent again (within request_timeout_s), up to this many "
            "replica deaths per call; then 503"
        ),
    )
    max_steps: int = Field(150, ge=1, description="the request's sampling steps")
    max_sample_pixels: int = Field(
        1536 * 1536, ge=64 * 64, description="width × height of each upscaled crop the inpainter samples"
    )
    max_faces_per_image: int = Field(16, ge=1, description="faces the inpainter refines in one image")
    max_work_units: float = Field(
        4000,
        gt=0,
        description="the request's sampling work: Σ over faces of UNet steps (cycles, unsampler hooks, black-patch "
        "retries, ControlNet) × crop pixels / 512²",
    )
    max_prompt_tokens: int = Field(
        750,
        ge=75,
        description="CLIP tokens one face's prompts give the UNet to attend to, in whole 75-token windows, after "
        "wildcards and BREAK",
    )
    max_prompt_chars: int = Field(
        20000, ge=100, description="characters of each of positive, negative and wildcard (checked on arrival)"
    )
    # Videos (POST /v1/detail/video, serve_app/video): checked before decoding where the container tells.
    max_video_upload_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="bytes of one uploaded video")
    max_video_seconds: float = Field(60.0, gt=0, description="duration of one video")
    max_video_frames: int = Field(900, ge=1, description="frames of one video")
    max_video_pixels: int = Field(1920 * 1080, ge=64 * 64, description="width × height of a video's frames")
    max_video_work_units: float = Field(
        50000, gt=0, description="a video's work units (as max_work_units) over every face of every frame"
    )
    video_parallel_segments: int = Field(
        2, ge=1, le=64, description="segments of one video sampled at once (spread over the inpainter replicas)"
    )


API_SCOPES = ("detail", "admin")
Scope = Literal["detail", "admin"]
KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"


class KeyQuotas(StrictModel):
    """One API key's quotas (``null``: unlimited); over one the service answers 429 with Retry-After."""

    requests_per_minute: int | None = Field(
        None, ge=1, description="detail requests (/v1/detail, /v1/detail/stream) started in any 60 s window"
    )
    concurrent_crops: int | None = Field(
        None, ge=1, description="crops the key's running requests may hold at once (a request holds its planned faces)"
    )
    work_units_per_hour: float | None = Field(
        None, gt=0, description="work units (limits.max_work_units' count) of the requests planned in any 3600 s window"
    )


class ApiKeyArgs(StrictModel):
    """One API key: its id (never secret), the SHA-256 of its value, what it may do and how much."""

    id: str = Field(pattern=KEY_ID_PATTERN, description="names the key in logs, /v1/stats and the fair queue")
    hash: str = Field(pattern=KEY_HASH_PATTERN, description="sha256:<64 hex> of the key (`facedetailer keys new`)")
    scopes: list[Scope] = Field(min_length=1, description="detail: the detail routes; admin: /v1/stats")
    quotas: KeyQuotas = KeyQuotas()
    weight: float = Field(1.0, gt=0, le=1000, description="the key's share of the inpainter relative to other keys")


class AuthArgs(StrictModel):
    """API keys (``docs/auth.md``): sent as ``Authorization: Bearer <key>``, stored hashed.

    Keys come from ``keys`` (inline, hashes only) and/or ``keys_file`` (YAML or JSON: a list of
    keys, or ``{keys: [...]}``; e.g. a mounted Kubernetes secret). The file is re-read when its
    content changes (checked every ``reload_interval_s``), so keys rotate without a restart.
    """

    keys: list[ApiKeyArgs] = Field(default_factory=list, description="keys written in the config (hashes only)")
    keys_file: str | None = Field(None, description="a YAML/JSON file of keys, re-read when it changes")
    reload_interval_s: float = Field(2.0, gt=0, le=300, description="how often keys_file is checked for changes")
    fair_queueing: bool = Field(
        True, description="share the inpainter between keys by weight (false: one first-come queue for all)"
    )

    @model_validator(mode="after")
    def _some_keys(self) -> AuthArgs:
        if not self.keys and self.keys_file is None:
            raise ValueError("auth: set keys (inline) or keys_file (a mounted secret), or remove auth")
        check_unique_keys(self.keys, "auth.keys")
        return self


def check_unique_keys(keys: list[ApiKeyArgs], where: str) -> None:
    """Two keys with one id, or one secret under two ids, is a configuration error."""
    seen_ids: set[str] = set()
    seen_hashes: set[str] = set()
    for key in keys:
        if key.id in seen_ids:
            raise ValueError(f"{where}: key id {key.id!r} appears twice")
        if key.hash in seen_hashes:
            raise ValueError(f"{where}: key {key.id!r} has the same hash as another key")
        seen_ids.add(key.id)
        seen_hashes.add(key.hash)


class AppArgs(StrictModel):
    """Everything :func:`serve_app.app.build_app` needs.

    Each model kind takes one model (``detector``, ``segm_detector``, ``sam``; it is named
    ``default``) or several by name (``detectors``, ``segm_detectors``, ``sam_models``: a request
    picks one with ``bbox_detector``/``segm_detector``/``sam_model``; the first is the default).
    A plain string in a named mapping is the model reference with default settings.
    """

    detector: DetectorArgs | None = None
    detectors: dict[str, DetectorArgs] | None = Field(None, description="bbox detectors by name")
    segm_detector: DetectorArgs | None = None
    segm_detectors: dict[str, DetectorArgs] | None = Field(None, description="segm detectors by name")
    sam: SamArgs | None = None
    sam_models: dict[str, SamArgs] | None = Field(None, description="SAM models by name")
    inpainter: InpainterArgs
    text_encoder: TextEncoderArgs | None = Field(
        None, description="a shared text encoder deployment for SD3/Flux checkpoints (else each inpainter has its own)"
    )
    controlnets: dict[str, ControlNetArgs] | None = Field(
        None, description="ControlNets by name; a request picks one with controlnet.name"
    )
    ingress: DeploymentOptions = DeploymentOptions(max_ongoing_requests=16)
    limits: Limits = Limits()
    wildcards_dir: str | None = Field(
        None, description="folder of wildcard .txt files for __name__ (names stay inside it)"
    )
    auth: AuthArgs | None = Field(None, description="API keys, scopes and quotas (docs/auth.md); absent: open")

    @field_validator("detectors", "segm_detectors", mode="before")
    @classmethod
    def _detector_reference_shorthand(cls, value: Any) -> Any:
        return _shorthand(value, "model")

    @field_validator("controlnets", mode="before")
    @classmethod
    def _controlnet_reference_shorthand(cls, value: Any) -> Any:
        return _shorthand(value, "model")

    @field_validator("sam_models", mode="before")
    @classmethod
    def _sam_reference_shorthand(cls, value: Any) -> Any:
        return _shorthand(value, "checkpoint")

    @model_validator(mode="after")
    def _one_form_per_model_kind(self) -> AppArgs:
        pairs = (("detector", "detectors"), ("segm_detector", "segm_detectors"), ("sam", "sam_models"))
        for single, named in pairs:
            if getattr(self, single) is not None and getattr(self, named) is not None:
                raise ValueError(f"set either {single} or {named}, not both")
            mapping = getattr(self, named)
            if mapping is not None:
                if not mapping:
                    raise ValueError(f"{named}: name at least one model")
                for name in mapping:
                    if not re.fullmatch(NAME_PATTERN, name):
                        raise ValueError(f"{named}: name {name!r} must match {NAME_PATTERN}")
        for name in self.controlnets or {}:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"controlnets: name {name!r} must match {NAME_PATTERN}")
        if self.detector is None and self.detectors is None:
            raise ValueError("a bbox detector is required: set detector (one model) or detectors (by name)")
        return self

    @model_validator(mode="after")
    def _drain_within_the_request_deadline(self) -> AppArgs:
        """A stopping replica may finish whatever it accepted: unset shutdown timeouts follow the request deadline."""
        for options in self.deployment_options():
            if options.graceful_shutdown_timeout_s is None:
                options.graceful_shutdown_timeout_s = self.limits.request_timeout_s + DRAIN_MARGIN_S
        return self

    def deployment_options(self) -> list[DeploymentOptions]:
        """The scheduling options of every deployment the application runs."""
        models = [*self.named_detectors().values(), *self.named_segm_detectors().values()]
        models += [*self.named_sam_models().values(), self.inpainter]
        return [model.deployment for model in models] + [self.ingress]

    def named_detectors(self) -> dict[str, DetectorArgs]:
        if self.detectors is not None:
            return self.detectors
        assert self.detector is not None  # the validator requires one of the two forms
        return {DEFAULT_NAME: self.detector}

    def named_segm_detectors(self) -> dict[str, DetectorArgs]:
        if self.segm_detectors is not None:
            return self.segm_detectors
        return {DEFAULT_NAME: self.segm_detector} if self.segm_detector is not None else {}

    def named_sam_models(self) -> dict[str, SamArgs]:
        if self.sam_models is not None:
            return self.sam_models
        return {DEFAULT_NAME: self.sam} if self.sam is not None else {}


def _shorthand(value: Any, key: str) -> Any:
    """``{name: "reference"}`` → ``{name: {key: "reference"}}``."""
    if isinstance(value, dict):
        return {name: {key: item} if isinstance(item, str) else item for name, item in value.items()}
    return value
