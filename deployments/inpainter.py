"""The diffusion inpainter: FaceDetailer's "encode → sample → decode" of each upscaled face crop.

:class:`Inpainter` loads a checkpoint of one of the model families of :mod:`deployments.families`
(SD 1.x/2.x/XL eps or v-prediction, SD3/SD3.5, Flux.1 dev/schnell/Fill; a diffusers folder, one
single file or ComfyUI's split layout) and keeps diffusers for the models only: denoiser (UNet or
transformer), VAE, text encoders. Sampling is ComfyUI's own arithmetic from
:mod:`deployments.sampling` (one generator per crop and cycle that yields each model evaluation
it needs), and the crops of all requests are driven together by the step-level engine of
:mod:`deployments.inpainter_engine`: crops with different settings share model calls, one crop's
result never depends on which crops it shared them with.

This class is the engine's model side (:class:`~deployments.inpainter_engine.EngineBackend`):
it prepares a crop (VAE encode, text conditioning, noise mask, inpainting-model conditioning),
runs one batched model call with per-sample timesteps for a group of crops, and decodes finished
crops; what depends on the model (latent format, model sampling, text encoders, the model call)
is its family's. ``refine`` runs the engine in the caller's thread (the in-process path); the
Ray Serve deployment (``deployments.serving``) runs the same engine in a background thread.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydantic
import torch
import torch.nn.functional as F

from deployments.controlnet import ControlNetSet
from deployments.families import CheckpointSource, FamilyRow, ModelFamily, TextConditioning, load_family, text
from deployments.families.loading import public_reference
from deployments.inpainter_engine import CropProgress, EngineCrop, EngineRequest, InpaintEngine
from deployments.inpainter_hooks import check_cycle_plan, cycle_noise, hook_stages, hooked_cycle
from deployments.inpainter_loading import (
    ComponentsLoader,
    LoraPatcher,
    load_sd_components,
    lora_key,
    pick_device,
    pick_dtype,
)
from deployments.sampling import (
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    UNetRequest,
    UNetResponse,
    UnsupportedSamplerError,
    crop_process,
    validate,
)
from deployments.text_encoder import SharedTextEncoding, TextEncoderClient
from facedetailer.controlnet import ControlHint
from facedetailer.cycle_hooks import NoiseInjectionStep, UnsampleStep
from facedetailer.hooks import DetailerHook, DetailerHooks
from facedetailer.prompt_weights import PromptSyntaxError, check_prompt

__all__ = [
    "CycleSpec",
    "Inpainter",
    "RefineJob",
    "RefineResult",
    "SamplingSettings",
    "UnsupportedSamplerError",
    "count_prompt_windows",
    "plan_cycles",
]

logger = logging.getLogger(__name__)

SEED_MODULUS = 2**64
PROMPT_CACHE_SIZE = 128


class SamplingSettings(pydantic.BaseModel):
    """How one crop is sampled (the FaceDetailer node's names); crops of one call may differ."""

    steps: int = pydantic.Field(20, ge=1, le=10000)
    cfg: float = pydantic.Field(8.0, ge=0.0, le=100.0)
    sampler_name: str = "euler"
    scheduler: str = "normal"
    denoise: float = pydantic.Field(0.5, gt=0.0, le=1.0)
    cycle: int = pydantic.Field(1, ge=1, le=10)
    noise_mask_feather: int = pydantic.Field(20, ge=0, le=100)  # > 0: differential diffusion
    inpaint_model: bool = False  # condition an inpainting model (InpaintModelConditioning): SD 9-channel, Flux Fill
    # FluxGuidance: the guidance a guidance-distilled model (Flux.1 dev, Fill) is given; others ignore it, as ComfyUI
    guidance: float = pydantic.Field(3.5, ge=0.0, le=100.0)
    # The request's detailer hooks; those with hook points inside sampling act per cycle
    # (deployments.inpainter_hooks), the others are the pipeline's and are ignored here.
    detailer_hooks: list[DetailerHook] = pydantic.Field(default_factory=list)


@dataclass
class RefineJob:
    """One face crop, upscaled to the size it is sampled at, and how to sample it."""

    image: np.ndarray  # uint8 [H', W', 3] RGB, the upscaled crop
    # float32 [h, w] in [0, 1]: the feathered noise mask at the crop's own (not upscaled) size,
    # as FaceDetailer hands it to the sampler; it is stretched over the image. None: no mask.
    noise_mask: np.ndarray | None
    positive: tuple[str, ...]  # chunks, each encoded alone, joined on the token axis; () = ""
    negative: tuple[str, ...] | None  # None: no negative at all (basic guidance: needs cfg 1)
    seed: int  # cycle c samples with (seed + c) mod 2**64
    loras: tuple[tuple[str, float, float], ...] = ()  # (name, model_weight, clip_weight)
    settings: SamplingSettings | None = None  # this crop's settings; None: the call's
    control: ControlHint | None = None  # a ControlNet for this crop (deployments/controlnet.py)
    # Video temporal consistency (serve_app/video, :func:`blended_initial_latent`): sampling starts
    # from (1 − w)·encode(image) + w·init_latent, e.g. the same track's latent in the previous frame.
    init_latent: np.ndarray | None = None  # float32 [1, C, h, w], this crop's latent shape
    init_latent_weight: float = 0.0
    return_latent: bool = False  # RefineResult.latents gets this crop's final latent (float32, host)


@dataclass(frozen=True)
class CycleSpec:
    """One KSampler run of a crop. FaceDetailer's cycle c uses the crop's settings and seed + c.

    Per-cycle hooks (reference §6.6): ``pre_ksample`` has set the values (a denoise schedule
    changes ``denoise``; 0 = the cycle samples nothing), ``latent_steps`` are ``cycle_latent``'s
    noise injection / unsampling, each a stage of its own before the cycle, and
    ``get_custom_noise`` gets ``noise_seed`` (seed + c). ``noise`` replaces the initial noise.
    """

    sampler_name: str
    scheduler: str
    steps: int
    denoise: float
    cfg: float
    seed: int
    noise: torch.Tensor | None = None
    latent_steps: tuple[NoiseInjectionStep | UnsampleStep, ...] = ()
    noise_seed: int = 0


def plan_cycles(job: RefineJob, settings: SamplingSettings) -> list[CycleSpec]:
    """FaceDetailer's cycles: the same settings each time, seed + c (reference §6.6), as the hooks change them."""
    hooks = DetailerHooks.of(settings.detailer_hooks)
    return [CycleSpec(**hooked_cycle(hooks, settings, int(job.seed), cycle)) for cycle in range(settings.cycle)]


@dataclass
class CropPayload:
    """What the engine carries for a crop: the job, its resolved settings and its cycles."""

    job: RefineJob
    settings: SamplingSettings
    cycles: list[CycleSpec]


@dataclass
class RefineResult:
    """A refine call's refined crops (input order) and how long they waited for the engine."""

    images: list[np.ndarray]
    queue_wait_s: float = 0.0
    engine_s: float = 0.0  # in the engine: queue wait, preparation, sampling, decoding
    unet_evaluations: list[int] = field(default_factory=list)
    latents: list[np.ndarray | None] = field(default_factory=list)  # the final latents jobs asked for


class Inpainter:
    """Refines face crops with a diffusion checkpoint of any supported family, ComfyUI's sampling semantics."""

    def __init__(
        self,
        model: str | None = None,
        *,
        single_file_config: str | None = None,
        diffusion_model: str | None = None,
        text_encoders: Mapping[str, str] | None = None,
        vae: str | None = None,
        family: str | None = None,
        prediction: str | None = None,
        zsnr: bool | None = None,
        shift: float | None = None,
        device: str | None = None,
        dtype: str | None = None,
        lora_dir: str | None = None,
        cache_dir: str | None = None,
        max_batch_size: int = 8,
        max_queued_crops: int = 256,
        controlnets: Mapping[str, Mapping[str, Any]] | ControlNetSet | None = None,
        load_components: ComponentsLoader = load_sd_components,
        text_encoder: TextEncoderClient | None = None,
    ) -> None:
        """``load_components`` reads an SD ``model`` (and what this module cannot locate): real checkpoints by
        default; :func:`deployments.model_loading.load_inpainter` passes the loader that also takes ``sim://``.
        ``text_encoder``: the shared text encoder, for this checkpoint's prompts; an SD3/Flux checkpoint then
        loads no text encoders of its own (:mod:`deployments.text_encoder`)."""
        self.source = CheckpointSource(
            model=model,
            config=single_file_config,
            diffusion_model=diffusion_model,
            text_encoders=dict(text_encoders or {}),
            vae=vae,
            family=family,
            prediction=prediction,
            zsnr=zsnr,
            shift=shift,
        )
        self.model = self.source.label
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.lora_dir = Path(lora_dir) if lora_dir else None
        started = time.perf_counter()
        shared = SharedTextEncoding(
            text_encoder, device=self.device, dtype=self.dtype, names=tuple(text_encoders or {}) or None
        ) if text_encoder is not None else None  # fmt: skip
        self.family: ModelFamily = load_family(
            self.source,
            device=self.device,
            dtype=self.dtype,
            cache_dir=Path(cache_dir) if cache_dir else None,
            load_components=load_components,
            text_encoding=shared,
        )
        self.components: Any = self.family.components
        self.vae_dtype = self.family.vae_dtype
        self.vae_scale_factor = 2 ** (len(self.family.vae.config.block_out_channels) - 1)
        self.model_sampling = self.family.model_sampling
        self.checkpoint_key = (self.family.name, self.model)  # part of every group key: one model per call
        self.loras = LoraPatcher(self.components, self.lora_dir)
        self.controlnets = ControlNetSet(
            controlnets,
            device=self.device,
            dtype=self.dtype,
            model_sampling=self.model_sampling,
            cache_dir=Path(cache_dir) if cache_dir else None,
        )
        if self.family.supports_controlnet:
            self.family.controlnets = self.controlnets
        self._prompts: OrderedDict[Hashable, TextConditioning] = OrderedDict()
        self._batch_conditioning: dict[Hashable, tuple[tuple, Any]] = {}
        self.engine = InpaintEngine(self, max_batch_size=max_batch_size, max_queued_crops=max_queued_crops)
        self.load_seconds = time.perf_counter() - started
        self.last_call: dict[str, Any] = {}
        logger.info(
            "inpainter %s (%s) loaded in %.2fs on %s/%s",
            self.model, self.family.title(), self.load_seconds, self.device, self.dtype,
        )  # fmt: skip

    @property
    def max_batch_size(self) -> int:
        return self.engine.max_batch_size

    def synchronize(self) -> None:
        """Wait until the device has run all launched work: called before a result is read on the host.

        A no-op on torch devices, whose reads (``.cpu()``, ``float(t)``, ``bool(t)``) synchronise
        by themselves; an accelerator that computes results eagerly and models the device time
        apart (the ``sim://`` stand-ins' ``unet.accelerator``) is told here.
        """
        accelerator = getattr(self.family.denoiser, "accelerator", None)
        if accelerator is not None:
            accelerator.synchronize()

    # ---------------------------------------------------------------- public API

    def supported_samplers(self) -> list[str]:
        return list(SAMPLER_NAMES)

    def supported_schedulers(self) -> list[str]:
        return list(SCHEDULER_NAMES)

    def prompt_tokenizers(self) -> list[tuple[Any, int]]:
        """Each text encoder's tokenizer and window length: what :func:`count_prompt_windows` needs.

        The ingress fetches them once per checkpoint to bound a request's prompt tokens before
        any model work (``limits.max_prompt_tokens``).
        """
        return self.family.prompt_tokenizers()

    def validate_settings(self, settings: SamplingSettings) -> None:
        """Reject what can't be run faithfully, before any model work.

        Raises :class:`UnsupportedSamplerError` for names and values ComfyUI's KSampler would not
        run the same way, ``ValueError`` for what this checkpoint's family cannot honour (an
        inpainting request on a model that is not one).
        """
        validate(settings.sampler_name, settings.scheduler, settings.steps, settings.denoise)
        if settings.inpaint_model and not self.family.is_inpaint:
            raise ValueError(
                f"inpaint_model=True needs an inpainting checkpoint (SD: a 9-channel UNet; Flux: Flux.1 Fill); "
                f"{self.family.inpaint_refusal()}"
            )

    def info(self) -> dict[str, Any]:
        return {
            **self.family.describe(),
            "model": public_reference(self.model),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vae_dtype": str(self.vae_dtype).removeprefix("torch."),
            "attention": "sdpa" if hasattr(F, "scaled_dot_product_attention") else "eager",
            "max_batch_size": self.engine.max_batch_size,
            "max_queued_crops": self.engine.max_queued_crops,
            "lora_dir": str(self.lora_dir) if self.lora_dir else None,
            "load_seconds": round(self.load_seconds, 3),
            "samplers": self.supported_samplers(),
            "schedulers": self.supported_schedulers(),
            "controlnets": self.controlnets.info(),
            "last_call": dict(self.last_call),
        }

    def check_health(self) -> None:
        """Raise if the replica can't serve: weights gone from the device or non-finite."""
        weight = self.family.parameters_for_health()
        if weight is None:
            return
        if weight.device.type != self.device.type or not torch.isfinite(weight).all():
            raise RuntimeError(f"inpainter model weights are unusable ({weight.device}, finite check failed)")

    def payloads(self, jobs: Sequence[RefineJob], settings: SamplingSettings | None = None) -> list[CropPayload]:
        """Check every crop and its settings before it reaches the engine (errors name the crop)."""
        payloads = []
        for index, job in enumerate(jobs):
            check_job(index, job)
            resolved = job.settings or settings
            if resolved is None:
                raise ValueError(f"job {index}: no sampling settings (neither the job's nor the call's)")
            self.validate_settings(resolved)
            self.family.check(index, job, resolved)
            check_cycle_plan(resolved)
            if job.control is not None:
                self.controlnets.check(index, job.control, self.family.denoiser.config)
            payloads.append(CropPayload(job=job, settings=resolved, cycles=plan_cycles(job, resolved)))
        return payloads

    def submit(
        self,
        jobs: Sequence[RefineJob],
        settings: SamplingSettings | None = None,
        *,
        tenant: str = "",
        weight: float = 1.0,
        on_progress: Callable[[CropProgress], None] | None = None,
    ) -> EngineRequest:
        """Queue crops on the engine (its background loop must run, see ``deployments.serving``).

        ``tenant``/``weight``: the engine's queue is fair between tenants; ``on_progress`` is told
        of every sampler step of the crops (in the engine's thread, see :class:`CropProgress`).
        """
        return self.engine.submit(self.payloads(jobs, settings), tenant=tenant, weight=weight, on_progress=on_progress)

    def cost(self, payload: CropPayload) -> float:
        """A crop's work for the engine's fair queue: model rows × steps × area in 512² units."""
        height, width = payload.job.image.shape[:2]
        area = height * width / (512 * 512)
        return area * sum(spec.steps * (1 if spec.cfg == 1.0 else 2) for spec in payload.cycles if spec.denoise > 0)

    def refine(self, jobs: Sequence[RefineJob], settings: SamplingSettings | None = None) -> list[np.ndarray]:
        """Refine every crop; return uint8 [H', W', 3] images in input order, each at its job's size."""
        return self.refine_result(jobs, settings).images

    def refine_result(self, jobs: Sequence[RefineJob], settings: SamplingSettings | None = None) -> RefineResult:
        """:meth:`refine` with the engine's queue wait and the UNet evaluations of each crop."""
        started = time.perf_counter()
        request = self.engine.submit(self.payloads(jobs, settings))
        images = self.engine.wait(request)
        self.last_call = {"crops": len(jobs), "seconds": round(time.perf_counter() - started, 3)}
        return result_of(request, images)

    # ---------------------------------------------------------------- engine backend: prepare

    def prepare(self, crops: Sequence[EngineCrop]) -> None:
        """VAE-encode, condition and plan newly admitted crops (batched by padded size)."""
        by_size = _group(crops, lambda crop: self._padded_size(crop.payload.job.image.shape))
        for padded, members in by_size.items():
            pixels = _device_pixels([_pad_image(crop.payload.job.image, padded) for crop in members], self.device)
            latents = self._encode(pixels)
            for position, crop in enumerate(members):
                crop.latent = blended_initial_latent(latents[position : position + 1], crop.payload.job)
                crop.state["padded"] = padded
                crop.state["control"] = self.controlnets.prepare(
                    crop.payload.job.control, crop.payload.job.image.shape[:2], padded
                )
            self._prepare_masks(members, pixels, padded, tuple(latents.shape[-2:]))
        for key, members in _group(crops, lambda crop: lora_key(crop.payload.job.loras)).items():
            self.loras.activate(key)
            for crop in members:
                self._prepare_conditioning(crop)
                # crops share a model call only with crops of the same LoRA set, latent size, checkpoint
                # and context length: every row of a call attends to the lcm of its rows' context
                # lengths, so one request's long prompts would multiply everyone's cross-attention
                context = math.lcm(*(row.text.context.shape[1] for row in (crop.state["positive"],
                                                                           crop.state["negative"]) if row))
                crop.group_key = (key, *tuple(crop.latent.shape[-2:]), self.checkpoint_key, context)
                crop.stages = []
                for number, spec in enumerate(crop.payload.cycles):
                    crop.stages += hook_stages(self, spec)  # cycle_latent: noise injection, unsampling
                    crop.stages.append(_CycleStage(self, number))

    def _padded_size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Decision 5: pad to the latent grid instead of cropping (no sub-pixel shift)."""
        factor = self.vae_scale_factor
        return (math.ceil(shape[0] / factor) * factor, math.ceil(shape[1] / factor) * factor)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Deterministic VAE encode (the latent distribution's mean, as ComfyUI's VAEEncode), in model space."""
        return self.family.encode_pixels(pixels)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → float [n, 3, H, W] in [0, 1] on the host."""
        images = self.family.decode_latents(latents)
        images = images.float().add_(1.0).div_(2.0).clamp_(0.0, 1.0)  # in place on the decoder's fresh output
        self.synchronize()  # the decoded pixels come back to the host
        return images.cpu()

    def _prepare_masks(
        self, crops: Sequence[EngineCrop], pixels: torch.Tensor, padded: tuple[int, int], latent_size: tuple[int, ...]
    ) -> None:
        """Each crop's noise mask on the latent grid, and an inpainting model's extra inputs.

        - The noise mask goes from the crop's size to the latent grid in ONE bilinear step, as
          ComfyUI's sampler resizes a latent's noise_mask (``prepare_mask``); only the cells over
          the image get it, the padding is never denoised.
        - ``inpaint_model`` on an inpainting checkpoint with a mask is InpaintModelConditioning:
          the mask goes to the pixel size first (bilinear), the pixels where round(mask) = 1 turn
          grey and are encoded; the family turns the pixel mask and that latent into its extra
          channels (SD: round(mask on the latent grid) and the latent; Flux Fill: the latent and
          the mask packed 8×8 into 64 channels).
        - An inpainting checkpoint otherwise gets the family's ``concat_cond`` from the noise mask
          (SD: with a noise mask, round(mask) and the cycle's input latent; without, ones and the
          grey latent).
        """
        height, width = latent_size[-2], latent_size[-1]
        factor = self.vae_scale_factor
        is_inpaint = self.family.is_inpaint
        for position, crop in enumerate(crops):
            job, settings = crop.payload.job, crop.payload.settings
            image_h, image_w = job.image.shape[:2]
            crop.state["differential"] = False
            crop.state["concat"] = None
            use_inpaint_model = is_inpaint and settings.inpaint_model and job.noise_mask is not None
            if use_inpaint_model:
                source = torch.from_numpy(np.clip(np.asarray(job.noise_mask, np.float32), 0.0, 1.0))
                pixel_mask = F.interpolate(source[None, None], size=(image_h, image_w), mode="bilinear")
                pixel_mask = F.pad(pixel_mask, (0, padded[1] - image_w, 0, padded[0] - image_h)).to(self.device)
                greyed = pixels[position : position + 1] * (1.0 - torch.round(pixel_mask))  # grey = 0 in [-1, 1]
                crop.state["mask"] = F.interpolate(pixel_mask, size=(height, width), mode="bilinear")
                crop.state["concat"] = self.family.inpaint_model_concat(crop.latent, pixel_mask, self._encode(greyed))
                crop.state["differential"] = settings.noise_mask_feather > 0
                continue
            if job.noise_mask is not None:
                crop.state["mask"] = stretch_to_latent_grid(
                    job.noise_mask, (height, width), (image_h / factor, image_w / factor)
                ).to(self.device)
                crop.state["differential"] = settings.noise_mask_feather > 0
            elif (image_h, image_w) != padded:
                # no mask, but padding: ones over the image's cells (a no-op blend), zeros outside
                ones = np.ones((1, 1), np.float32)
                crop.state["mask"] = stretch_to_latent_grid(
                    ones, (height, width), (image_h / factor, image_w / factor)
                ).to(self.device)
            else:
                crop.state["mask"] = None
            if is_inpaint:
                noise_mask = crop.state["mask"] if job.noise_mask is not None else None
                crop.state["concat"], per_cycle = self.family.default_concat(crop.latent, noise_mask)
                if per_cycle:
                    crop.state["concat_per_cycle"] = True  # SD: round(mask) + each cycle's input latent

    # ---------------------------------------------------------------- text

    def _prepare_conditioning(self, crop: EngineCrop) -> None:
        """The crop's rows: its positive and negative text (cached per LoRA set) and the family's extras.

        ``negative`` None (``negative: null``) samples with basic guidance: no negative row at all.
        """
        job, loras = crop.payload.job, lora_key(crop.payload.job.loras)
        extra = self.family.row_extras(crop.state["padded"], crop.payload.settings)
        crop.state["positive"] = FamilyRow(self._prompt(loras, job.positive), extra)
        negative = None if job.negative is None else FamilyRow(self._prompt(loras, job.negative), extra)
        crop.state["negative"] = negative

    def _prompt(self, loras: Hashable, chunks: tuple[str, ...]) -> TextConditioning:
        key = (loras, tuple(chunks) or ("",))
        cached = self._prompts.get(key)
        if cached is None:
            cached = self.family.encode_prompt(key[1])
            self._prompts[key] = cached
            while len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(key)
        return cached

    def _encode_prompt(self, chunks: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context, pooled) of a prompt's chunks: the family's text conditioning, uncached."""
        encoded = self.family.encode_prompt(tuple(chunks))
        return encoded.context, encoded.pooled

    # ---------------------------------------------------------------- engine backend: evaluate

    def order_groups(self, keys: Sequence[Hashable]) -> list[Hashable]:
        """Groups whose LoRA set is already merged first: at most one switch per step."""
        for stale in set(self._batch_conditioning) - set(keys):  # groups that are gone this step
            del self._batch_conditioning[stale]
        current = self.loras.current
        return sorted(keys, key=lambda key: key[0] != current)  # type: ignore[index]

    def evaluate(self, key: Hashable, calls: Sequence[tuple[EngineCrop, UNetRequest]]) -> list[UNetResponse]:
        """ONE model call for the pending requests of crops of one latent size and LoRA set.

        Rows: each crop's cond row, plus its uncond row when its sampler asks for it; each row
        with its own timestep, text conditioning, family extras and inpainting channels.
        """
        self.loras.activate(key[0])  # type: ignore[index]
        inputs: list[torch.Tensor] = []
        timesteps: list[float] = []
        for _, request in calls:
            inputs += [request.x_in] * (2 if request.uncond else 1)
            timesteps += [request.timestep] * (2 if request.uncond else 1)
        # The per-row conditioning only changes when the group's members, their cfg shortcut or
        # their cycle change: reuse the concatenated tensors of the previous step otherwise.
        composition = tuple((crop.serial, crop.stage_index, request.uncond) for crop, request in calls)
        cached = self._batch_conditioning.get(key)
        if cached is None or cached[0] != composition:
            cached = (composition, self._conditioning_rows(calls))
            self._batch_conditioning[key] = cached
        sample = torch.cat(inputs).to(self.device)
        timestep_rows = torch.tensor(timesteps, dtype=torch.float32, device=self.device)
        output = self.family.forward(calls, sample, timestep_rows, cached[1])
        responses: list[UNetResponse] = []
        row = 0
        for _, request in calls:
            cond = output[row : row + 1]
            uncond = output[row + 1 : row + 2] if request.uncond else None
            row += 2 if request.uncond else 1
            responses.append(UNetResponse(cond=cond, uncond=uncond))
        return responses

    def _conditioning_rows(self, calls: Sequence[tuple[EngineCrop, UNetRequest]]) -> Any:
        """The family's batched conditioning of a call's rows, in row order (cond, then uncond if asked)."""
        rows: list[FamilyRow] = []
        concats: list[torch.Tensor | None] = []
        for crop, request in calls:
            for side in ("positive", "negative") if request.uncond else ("positive",):
                row = crop.state[side]
                if row is None:  # the sampler asked for a negative the request does not have
                    raise ValueError("negative: null has no negative conditioning to evaluate")
                rows.append(row)
                concats.append(crop.state["concat"])
        return self.family.batch_rows(rows, concats)

    # ---------------------------------------------------------------- engine backend: finish

    def finish(self, crops: Sequence[EngineCrop]) -> list[np.ndarray]:
        """Decode finished crops (batched by padded size), cut the padding, quantise to uint8."""
        results: dict[int, np.ndarray] = {}
        for batch in _group(crops, lambda crop: tuple(crop.latent.shape[-2:])).values():
            latents = batch[0].latent if len(batch) == 1 else torch.cat([crop.latent for crop in batch])
            decoded = _quantised_images(self._decode(latents))  # the whole batch at once
            for image, crop in zip(decoded, batch, strict=True):
                height, width = crop.payload.job.image.shape[:2]
                fits = tuple(image.shape[:2]) == (height, width)
                results[id(crop)] = image if fits else np.ascontiguousarray(image[:height, :width])
        return [results[id(crop)] for crop in crops]


class _CycleStage:
    """FaceDetailer cycle ``number`` of a crop: a KSampler run from the crop's current latent."""

    def __init__(self, inpainter: Inpainter, number: int) -> None:
        self.inpainter, self.number = inpainter, number

    def __call__(self, crop: EngineCrop, latent: torch.Tensor) -> Any:
        spec = crop.payload.cycles[self.number]
        on_step = _step_reporter(crop, self.number) if crop.request.on_progress is not None else None
        if spec.denoise <= 0.0:  # a denoise schedule reached 0: this cycle samples nothing
            return _unchanged(latent)
        if crop.state.get("concat_per_cycle"):  # concat_cond: the sampler's input latent of this cycle
            crop.state["concat"] = self.inpainter.family.cycle_concat(latent, crop.state["mask"])
        return crop_process(
            self.inpainter.model_sampling,
            sampler_name=spec.sampler_name,
            scheduler=spec.scheduler,
            steps=spec.steps,
            denoise=spec.denoise,
            cfg=spec.cfg,
            seed=spec.seed,
            latent_image=latent,
            noise_mask=crop.state["mask"],
            differential=crop.state["differential"],
            noise=cycle_noise(crop.payload.settings.detailer_hooks, spec, latent),
            device=self.inpainter.device,
            slicing="impact",  # FaceDetailer samples through Impact's ksampler_wrapper
            output="denoised",  # …whose separated_sample returns the last callback x0
            synchronize=self.inpainter.synchronize,
            on_step=on_step,
        )


def _step_reporter(crop: EngineCrop, cycle: int) -> Callable[[int, int, torch.Tensor], None]:
    """The sampler's progress callback for one crop and cycle → its request's ``on_progress``.

    A listener that raises is logged and silenced for the rest of the request: progress must
    never fail the work it reports on.
    """
    request = crop.request

    def report(step: int, steps: int, denoised: torch.Tensor) -> None:
        listener = request.on_progress
        if listener is None:
            return
        progress = CropProgress(crop.index, cycle, len(crop.payload.cycles), step, steps, denoised)
        try:
            listener(progress)
        except Exception:
            logger.exception("progress listener failed; no more progress for this request")
            request.on_progress = None

    return report


def _unchanged(latent: torch.Tensor) -> Any:
    """A stage that needs no model call and hands its latent on."""
    yield from ()
    return latent


def result_of(request: EngineRequest, images: list[np.ndarray]) -> RefineResult:
    return RefineResult(
        images=images,
        queue_wait_s=request.queue_wait_s,
        engine_s=request.engine_s,
        unet_evaluations=[crop.unet_evaluations for crop in request.crops],
        latents=[_returned_latent(crop) for crop in request.crops],
    )


def blended_initial_latent(encoded: torch.Tensor, job: RefineJob) -> torch.Tensor:
    """The latent a crop starts sampling from: its VAE encoding, mixed with ``job.init_latent`` if set.

    (1 − w)·encoded + w·init_latent: a video track's crop pulled towards the same track's result in
    the previous frame (serve_app/video ``latent_blend``). Without ``init_latent``, ``encoded`` itself.
    """
    if job.init_latent is None or job.init_latent_weight == 0.0:
        return encoded
    previous = torch.from_numpy(np.asarray(job.init_latent, np.float32)).to(encoded.device, encoded.dtype)
    if tuple(previous.shape) != tuple(encoded.shape):
        raise ValueError(f"init_latent has shape {tuple(previous.shape)}, this crop's latent {tuple(encoded.shape)}")
    weight = float(job.init_latent_weight)
    return encoded * (1.0 - weight) + previous * weight


def _returned_latent(crop: EngineCrop) -> np.ndarray | None:
    """A finished crop's final latent on the host, when its job asked for it."""
    if not getattr(crop.payload.job, "return_latent", False) or crop.latent is None:
        return None
    return crop.latent.detach().float().cpu().numpy()


# -------------------------------------------------------------------- helpers


def check_job(index: int, job: RefineJob) -> None:
    image = job.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"job {index}: image must be uint8 [H, W, 3], got {getattr(image, 'shape', None)}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"job {index}: empty image {image.shape}")
    if not 0.0 <= job.init_latent_weight <= 1.0:
        raise ValueError(f"job {index}: init_latent_weight must be in [0, 1], got {job.init_latent_weight}")
    mask = job.noise_mask
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim != 2 or min(mask.shape) < 1:
            raise ValueError(f"job {index}: noise_mask must be a non-empty 2-D array, got shape {mask.shape}")
        if not np.isfinite(mask).all():
            raise ValueError(f"job {index}: noise_mask has non-finite values")
    for name in ("positive", "negative"):
        for chunk in getattr(job, name) or ():
            try:
                check_prompt(chunk)
            except PromptSyntaxError as error:
                raise PromptSyntaxError(f"job {index}: {name}: {error}") from error


def stretch_to_latent_grid(
    mask: np.ndarray, grid: tuple[int, int], extent: tuple[float, float]
) -> torch.Tensor:
    """A [h, w] mask resized bilinearly onto the first ``extent`` cells of a latent ``grid`` [1, 1, H, W].

    The image covers ``extent`` = (H'/8, W'/8) latent cells, a fraction when the image is padded
    to the grid. Each cell whose centre lies over the image samples the mask with torch's
    ``align_corners=False`` rule at scale mask size / extent; cells over the padding are 0. When
    the image fills the grid this is ``F.interpolate(mask, grid, mode="bilinear")``, ComfyUI's
    one-step resize of a noise mask to the latent.
    """
    mask = np.asarray(mask)
    rows, columns, left_tap, right_tap, row_fraction, col_fraction, inside = _stretch_taps(
        mask.shape[:2], tuple(grid), tuple(extent)
    )
    # only the taps are read: the cast to float32 and the clip to [0, 1] (both per element) on
    # them alone, not on the full-resolution mask
    taps = torch.from_numpy(np.clip(mask[rows][:, columns].astype(np.float32), 0.0, 1.0))
    top, bottom = taps[: len(row_fraction)], taps[len(row_fraction) :]  # the two source rows of every output row
    left = (1.0 - col_fraction) * top[:, left_tap] + col_fraction * top[:, right_tap]
    right = (1.0 - col_fraction) * bottom[:, left_tap] + col_fraction * bottom[:, right_tap]
    stretched = (1.0 - row_fraction)[:, None] * left + row_fraction[:, None] * right
    return (stretched * inside)[None, None]


@functools.lru_cache(maxsize=64)
def _stretch_taps(
    shape: tuple[int, int], grid: tuple[int, int], extent: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`stretch_to_latent_grid`'s sampling plan for one mask size and grid, remembered (crops repeat sizes).

    The source rows to read (the low taps, then the high ones), the distinct source columns, each
    output column's low and high tap among those, the two axes' weights and the inside-the-image flags.
    """
    row_low, row_high, row_fraction, row_inside = _bilinear_taps(shape[0], grid[0], extent[0])
    col_low, col_high, col_fraction, col_inside = _bilinear_taps(shape[1], grid[1], extent[1])
    rows = np.concatenate([row_low.numpy(), row_high.numpy()])
    columns = np.unique(np.concatenate([col_low.numpy(), col_high.numpy()]))
    left_tap = torch.from_numpy(np.searchsorted(columns, col_low.numpy()))
    right_tap = torch.from_numpy(np.searchsorted(columns, col_high.numpy()))
    return rows, columns, left_tap, right_tap, row_fraction, col_fraction, row_inside[:, None] * col_inside[None, :]


def _bilinear_taps(size_in: int, size_out: int, extent: float) -> tuple[torch.Tensor, ...]:
    """One axis of torch's bilinear (align_corners=False): source indices, weight, inside-the-image flag."""
    scale = torch.tensor(float(size_in), dtype=torch.float32) / torch.tensor(float(extent), dtype=torch.float32)
    centres = torch.arange(size_out, dtype=torch.float32) + 0.5
    source = torch.clamp(scale * centres - 0.5, min=0.0)
    low = torch.clamp(source.floor().long(), max=size_in - 1)
    high = torch.clamp(low + 1, max=size_in - 1)
    fraction = source - low.float()
    inside = (centres <= extent).float()  # a cell whose centre is over the padding gets 0
    return low, high, fraction, inside


def _group(items: Sequence[Any], key: Any) -> dict[Any, list[Any]]:
    """``items`` grouped by ``key(item)``, groups and members in first-seen order."""
    groups: dict[Any, list[Any]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return dict(groups)


def _pad_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Edge-replicate right/bottom to ``size`` so the VAE sees no artificial border."""
    pad_h, pad_w = size[0] - image.shape[0], size[1] - image.shape[1]
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else image


def _to_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC → float CHW in [-1, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0


def _device_pixels(images: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 HWC crops of one size → float [n, 3, H, W] in [-1, 1] on ``device``, as :func:`_to_pixels` each.

    The channels are split with OpenCV (one pass; numpy's and torch's strided transposes of
    3-channel bytes are 2–3× slower at 512²) into a fresh array, so a read-only input (Ray's object
    store) is never written. On an accelerator the bytes are uploaded as uint8 (a quarter of
    float pixels) and converted there; on the host the cast is numpy's (exact, several times
    faster than torch's uint8→float). The arithmetic is ``x / 127.5 - 1`` either way, in place.
    """
    height, width = images[0].shape[:2]
    on_host = device.type == "cpu"
    planes = np.empty((len(images), 3, height, width), np.float32 if on_host else np.uint8)
    for index, image in enumerate(images):
        for channel, plane in enumerate(cv2.split(image)):
            planes[index, channel] = plane
    pixels = torch.from_numpy(planes)
    if not on_host:
        pixels = pixels.to(device).float()
    return pixels.div_(127.5).sub_(1.0)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """float CHW in [0, 1] → uint8 HWC, truncating as ComfyUI's image conversion (``clip(255·x).astype(uint8)``)."""
    return (image.permute(1, 2, 0) * 255.0).clamp(0, 255).to(torch.uint8).numpy()


def _quantised_images(images: torch.Tensor) -> list[np.ndarray]:
    """float [n, 3, H, W] in [0, 1] → n uint8 [H, W, 3] images, truncating as :func:`_to_uint8`.

    ``images`` is scaled in place (the decoder's fresh output) and, since it is already in
    [0, 1], needs no clamp. The cast is numpy's on the host (exact, ~8× faster than torch's
    float→uint8) and on the device elsewhere (a quarter of the bytes come back); the planes are
    interleaved to HWC by OpenCV (one pass; torch's and numpy's strided transposes of 3-channel
    bytes took 1.4–1.7 ms at 512², OpenCV 0.03 ms).
    """
    scaled = images.mul_(255.0)
    planes = scaled.numpy().astype(np.uint8) if scaled.device.type == "cpu" else scaled.to(torch.uint8).cpu().numpy()
    return [cv2.merge(list(image)) for image in planes]


# The text helpers live with the families; these names stay importable from here (tests, benchmarks).
apply_token_weights = text.apply_token_weights
_special_tokens = text.special_tokens
_prompt_windows = text.prompt_windows
_repeat_to_common_length = text.repeat_to_common_length


def count_prompt_windows(tokenizers: Sequence[tuple[Any, int]], chunks: Sequence[str]) -> int:
    """The 75-token windows a prompt's chunks take (``()`` is the empty prompt: one).

    Cut exactly as the families' CLIP encoders cut them (:func:`deployments.families.text.prompt_windows`);
    the most over the checkpoint's tokenizers (:meth:`ModelFamily.prompt_tokenizers`: SDXL's two
    cut alike; a T5 sequence counted in windows of the same size).
    """
    texts = tuple(chunks) or ("",)
    return max(
        sum(len(text.prompt_windows(tokenizer, chunk, length)[0]) for chunk in texts)
        for tokenizer, length in tokenizers
    )
