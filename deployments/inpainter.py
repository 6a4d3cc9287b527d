"""The diffusion inpainter: FaceDetailer's "encode → sample → decode" of each upscaled face crop.

:class:`Inpainter` loads a Stable Diffusion checkpoint (SD 1.x/2.x/XL, normal or 9-channel
inpainting; diffusers folder or single file, see :mod:`deployments.inpainter_loading`) and
refines batches of crops with its own sampling loop over the checkpoint's components. The
high-level diffusers pipelines can't reproduce ComfyUI's semantics all at once:

- ``denoise`` as ComfyUI's KSampler: a schedule of ``floor(steps / denoise)`` steps whose last
  ``steps`` are run (``steps`` UNet evaluations, not ``steps · denoise``);
- a latent noise mask (outside it the latent stays the original, re-noised to each step's
  level) and differential diffusion (a soft mask thresholded per step);
- 9-channel InpaintModelConditioning, cycles that resample the previous cycle's latent;
- one CPU generator per crop, so a crop's result never depends on its batch neighbours.

``docs/samplers.md`` documents the sampler/scheduler mapping. The class is wrapped as a Ray Serve
deployment by ``serve_app.app``; its constructor takes JSON-able values only.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import torch
import torch.nn.functional as F

from deployments.inpainter_loading import (
    LoraPatcher,
    SDComponents,
    describe,
    load_sd_components,
    pick_device,
    pick_dtype,
)
from deployments.inpainter_samplers import (
    SAMPLERS,
    UnsupportedSamplerError,
    build_scheduler,
    sampler_spec,
    schedulers_for,
    set_timesteps,
    supported_samplers,
    supported_schedulers,
)
from facedetailer.seeds import SEED_MODULUS, DenoiseSchedule, comfy_denoise_schedule

__all__ = ["Inpainter", "RefineJob", "SamplingSettings", "UnsupportedSamplerError"]

logger = logging.getLogger(__name__)


class SamplingSettings(pydantic.BaseModel):
    """Sampling parameters shared by every crop of one call (the FaceDetailer node's names)."""

    steps: int = pydantic.Field(20, ge=1, le=10000)
    cfg: float = pydantic.Field(8.0, ge=0.0, le=100.0)
    sampler_name: str = "euler"
    scheduler: str = "normal"
    denoise: float = pydantic.Field(0.5, gt=0.0, le=1.0)
    cycle: int = pydantic.Field(1, ge=1, le=10)
    noise_mask_feather: int = pydantic.Field(20, ge=0, le=100)  # > 0: differential diffusion
    inpaint_model: bool = False  # condition a 9-channel inpainting UNet (InpaintModelConditioning)


@dataclass
class RefineJob:
    """One face crop, already upscaled to the size it is sampled at."""

    image: np.ndarray  # uint8 [H', W', 3] RGB
    noise_mask: np.ndarray | None  # float32 [H', W'] in [0, 1], feathered and resized; None: no mask
    positive: tuple[str, ...]  # chunks, each encoded alone, joined on the token axis; () = ""
    negative: tuple[str, ...]
    seed: int  # cycle c samples with (seed + c) mod 2**64
    loras: tuple[tuple[str, float, float], ...] = ()  # (name, model_weight, clip_weight)


@dataclass
class _Conditioning:
    """Text conditioning of one batch, uncond first as in diffusers' CFG batching."""

    positive: torch.Tensor  # [B, L, D]
    negative: torch.Tensor  # [B, L, D]
    positive_added: dict[str, torch.Tensor] | None  # SDXL: text_embeds + time_ids
    negative_added: dict[str, torch.Tensor] | None


@dataclass
class _InpaintConditioning:
    """The extra 5 UNet input channels of an inpainting checkpoint."""

    mask: torch.Tensor  # [B, 1, h, w]
    masked_image_latents: torch.Tensor  # [B, C, h, w]


class Inpainter:
    """Refines face crops with a Stable Diffusion checkpoint, ComfyUI's sampling semantics."""

    def __init__(
        self,
        model: str,
        *,
        single_file_config: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        lora_dir: str | None = None,
        cache_dir: str | None = None,
        max_batch_size: int = 8,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_batch_size = max_batch_size
        self.lora_dir = Path(lora_dir) if lora_dir else None
        started = time.perf_counter()
        self.components: SDComponents = load_sd_components(
            model,
            single_file_config=single_file_config,
            dtype=self.dtype,
            cache_dir=Path(cache_dir) if cache_dir else None,
        )
        parts = self.components
        # fp16 SDXL VAEs overflow; diffusers marks them force_upcast and decodes in float32.
        upcast_vae = self.dtype == torch.float16 and getattr(parts.vae.config, "force_upcast", False)
        self.vae_dtype = torch.float32 if upcast_vae else self.dtype
        for module, module_dtype in [(parts.unet, self.dtype), (parts.vae, self.vae_dtype)] + [
            (encoder, self.dtype) for encoder in parts.text_encoders
        ]:
            module.to(self.device)
            if module.dtype != module_dtype:  # loaded in self.dtype; only an upcast VAE differs
                module.to(dtype=module_dtype)
            module.eval().requires_grad_(False)
        self.vae_scale_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        self.loras = LoraPatcher(parts, self.lora_dir)
        # Serve may run calls concurrently in threads; LoRA merging mutates the weights, so the
        # model work of one call never overlaps another's.
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - started
        self.last_call: dict[str, Any] = {}
        logger.info("inpainter %s loaded in %.2fs on %s/%s", model, self.load_seconds, self.device, self.dtype)

    # ---------------------------------------------------------------- public API

    def supported_samplers(self) -> list[str]:
        return supported_samplers()

    def supported_schedulers(self) -> list[str]:
        return supported_schedulers()

    def validate_settings(self, settings: SamplingSettings) -> None:
        """Reject what can't be run faithfully, before any model work.

        Raises :class:`UnsupportedSamplerError` for names and pairs, ``ValueError`` for an
        inpainting request on a 4-channel UNet or a schedule the scheduler class refuses.
        """
        sampler_spec(settings.sampler_name, settings.scheduler)
        if settings.inpaint_model and not self.components.is_inpaint:
            raise ValueError(
                f"inpaint_model=True needs an inpainting checkpoint (9-channel UNet); {self.model} has "
                f"{self.components.unet.config.in_channels} input channels"
            )
        plan = comfy_denoise_schedule(settings.steps, settings.denoise)
        scheduler = build_scheduler(self.components.scheduler_config, settings.sampler_name, settings.scheduler)
        try:
            set_timesteps(scheduler, plan.total_steps)
        except (ValueError, IndexError) as error:
            raise UnsupportedSamplerError(
                f"{settings.sampler_name}/{settings.scheduler} cannot build a {plan.total_steps}-step schedule "
                f"(steps={settings.steps}, denoise={settings.denoise}): {error}"
            ) from error

    def info(self) -> dict[str, Any]:
        return {
            **describe(self.components),
            "model": self.model,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vae_dtype": str(self.vae_dtype).removeprefix("torch."),
            "attention": "sdpa" if hasattr(F, "scaled_dot_product_attention") else "eager",
            "max_batch_size": self.max_batch_size,
            "lora_dir": str(self.lora_dir) if self.lora_dir else None,
            "load_seconds": round(self.load_seconds, 3),
            "samplers": {name: schedulers_for(name) for name in supported_samplers()},
            "last_call": dict(self.last_call),
        }

    def check_health(self) -> None:
        """Raise if the replica can't serve: weights gone from the device or non-finite."""
        weight = next(self.components.unet.parameters())
        if weight.device.type != self.device.type or not torch.isfinite(weight).all():
            raise RuntimeError(f"inpainter UNet weights are unusable ({weight.device}, finite check failed)")

    def refine(self, jobs: Sequence[RefineJob], settings: SamplingSettings) -> list[np.ndarray]:
        """Refine every crop; return uint8 [H', W', 3] images in input order, each at its job's size."""
        self.validate_settings(settings)
        for index, job in enumerate(jobs):
            check_job(index, job)
        with self._lock:
            return self._refine_all(jobs, settings)

    def _refine_all(self, jobs: Sequence[RefineJob], settings: SamplingSettings) -> list[np.ndarray]:
        """Group by LoRA set, then padded size; one UNet batch per group chunk."""
        started = time.perf_counter()
        plan = comfy_denoise_schedule(settings.steps, settings.denoise)
        results: list[np.ndarray | None] = [None] * len(jobs)
        batches = 0
        for lora_key, indices in _group(jobs, lambda job: _lora_key(job.loras)).items():
            with self.loras.applied(lora_key):
                by_size = _group([jobs[i] for i in indices], lambda job: self._padded_size(job.image.shape))
                for members in by_size.values():
                    group = [indices[i] for i in members]
                    for start in range(0, len(group), self.max_batch_size):
                        chunk = group[start : start + self.max_batch_size]
                        for index, image in zip(
                            chunk, self._refine_batch([jobs[i] for i in chunk], settings, plan), strict=True
                        ):
                            results[index] = image
                        batches += 1
        self.last_call = {"crops": len(jobs), "batches": batches, "seconds": round(time.perf_counter() - started, 3)}
        assert all(image is not None for image in results)
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------- one batch

    @torch.inference_mode()
    def _refine_batch(
        self, jobs: Sequence[RefineJob], settings: SamplingSettings, plan: DenoiseSchedule
    ) -> list[np.ndarray]:
        """Crops of one padded size and LoRA set: encode, sample ``cycle`` times, decode."""
        height, width = jobs[0].image.shape[:2]
        padded = self._padded_size((height, width))
        pixels = torch.stack([_to_pixels(_pad_image(job.image, padded)) for job in jobs]).to(self.device)
        latents = self._encode(pixels)
        mask = self._latent_mask(jobs, padded, latents.shape[-2:])
        inpaint = self._inpaint_conditioning(jobs, settings, pixels, padded, latents.shape[-2:])
        conditioning = self._conditioning(jobs, padded)
        differential = mask is not None and settings.noise_mask_feather > 0
        for cycle in range(settings.cycle):
            seeds = [(job.seed + cycle) % SEED_MODULUS for job in jobs]
            latents = self._sample(latents, seeds, conditioning, settings, plan, mask, differential, inpaint)
        decoded = self._decode(latents)
        return [
            _to_uint8(image[:, : job.image.shape[0], : job.image.shape[1]])
            for image, job in zip(decoded, jobs, strict=True)
        ]

    def _padded_size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Decision 5: pad to the latent grid instead of cropping (no sub-pixel shift)."""
        factor = self.vae_scale_factor
        return (math.ceil(shape[0] / factor) * factor, math.ceil(shape[1] / factor) * factor)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Deterministic VAE encode: the latent distribution's mean, as ComfyUI's VAEEncode."""
        vae = self.components.vae
        mean = vae.encode(pixels.to(self.vae_dtype)).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (mean - shift) * vae.config.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        images = vae.decode((latents / vae.config.scaling_factor + shift).to(self.vae_dtype)).sample
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()

    def _latent_mask(
        self, jobs: Sequence[RefineJob], padded: tuple[int, int], latent_size: torch.Size
    ) -> torch.Tensor | None:
        """ComfyUI's noise_mask: bilinear to the latent grid; the padding is never denoised.

        A crop without a mask gets ones over the image (identical to no masking) and zeros over
        its padding, so its result is the same alone or next to masked crops of the same size.
        """
        needs_padding = any(job.image.shape[:2] != padded for job in jobs)
        if not needs_padding and all(job.noise_mask is None for job in jobs):
            return None
        masks = []
        for job in jobs:
            mask = job.noise_mask if job.noise_mask is not None else np.ones(job.image.shape[:2], np.float32)
            masks.append(torch.from_numpy(_pad_mask(mask, padded)))
        stacked = torch.stack(masks)[:, None].to(self.device)
        return F.interpolate(stacked, size=tuple(latent_size), mode="bilinear", align_corners=False)

    def _inpaint_conditioning(
        self,
        jobs: Sequence[RefineJob],
        settings: SamplingSettings,
        pixels: torch.Tensor,
        padded: tuple[int, int],
        latent_size: torch.Size,
    ) -> _InpaintConditioning | None:
        """The mask and masked-image latent a 9-channel UNet takes (ComfyUI InpaintModelConditioning).

        A crop with a noise mask and ``inpaint_model`` gets its mask (rounded) and its image with
        the mask > 0.5 area set to grey. Otherwise the checkpoint still needs 9 channels: as
        ComfyUI does for an inpainting model without inpaint conditioning, the mask is all ones
        and the masked image all grey ("everything may change", plain img2img).
        """
        if not self.components.is_inpaint:
            return None
        pixel_masks = []
        for job in jobs:
            use_mask = settings.inpaint_model and job.noise_mask is not None
            mask = job.noise_mask if use_mask else np.ones(job.image.shape[:2], np.float32)
            pixel_masks.append(torch.from_numpy(_pad_mask(mask, padded)))
        pixel_mask = torch.stack(pixel_masks)[:, None].to(self.device)
        keep = 1.0 - torch.round(pixel_mask)  # pixels [-1, 1]: grey 0.5 is 0
        masked_latents = self._encode(pixels * keep)
        latent_mask = F.interpolate(pixel_mask, size=tuple(latent_size), mode="bilinear", align_corners=False)
        return _InpaintConditioning(mask=torch.round(latent_mask), masked_image_latents=masked_latents)

    # ---------------------------------------------------------------- text

    def _conditioning(self, jobs: Sequence[RefineJob], padded: tuple[int, int]) -> _Conditioning:
        """Encode every distinct prompt once; match token lengths across the batch."""
        cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}

        def encode(chunks: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
            key = tuple(chunks) or ("",)
            if key not in cache:
                cache[key] = self._encode_prompt(key)
            return cache[key]

        positives = [encode(job.positive) for job in jobs]
        negatives = [encode(job.negative) for job in jobs]
        embeds = _repeat_to_common_length([embed for embed, _ in positives + negatives])
        positive, negative = embeds[: len(jobs)], embeds[len(jobs) :]
        if not self.components.is_sdxl:
            return _Conditioning(positive, negative, None, None)
        # SDXL's size conditioning: ComfyUI passes the latent size × 8 as original and target size.
        time_ids = torch.tensor([[padded[0], padded[1], 0, 0, padded[0], padded[1]]], dtype=self.dtype)
        time_ids = time_ids.to(self.device).repeat(len(jobs), 1)

        def added(pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
            pooled = torch.cat([pooled for _, pooled in pairs if pooled is not None])
            return {"text_embeds": pooled, "time_ids": time_ids}

        return _Conditioning(positive, negative, added(positives), added(negatives))

    def _encode_prompt(self, chunks: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[1, 77·n, D] hidden states (+ SDXL's pooled embedding of the first window).

        Each chunk (a BREAK / [CONCAT] part) is tokenised on its own into 77-token windows
        (BOS + 75 + EOS, padded), every window is encoded separately and the results are
        concatenated along the token axis, like ComfyUI's CLIPTextEncode + ConditioningConcat.
        """
        parts = self.components
        hidden_parts: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders, strict=True):
            length = min(int(tokenizer.model_max_length), int(encoder.config.max_position_embeddings))
            windows = [window for chunk in chunks for window in _token_windows(tokenizer, chunk, length)]
            ids = torch.tensor(windows, dtype=torch.long, device=self.device)
            output = encoder(ids, output_hidden_states=parts.is_sdxl)
            # SD 1.x/2.x: last layer (diffusers' SD 2 encoders already end at the penultimate
            # OpenCLIP layer); SDXL: both encoders' penultimate layer, without the final norm.
            hidden = output.hidden_states[-2] if parts.is_sdxl else output.last_hidden_state
            hidden_parts.append(hidden.reshape(1, -1, hidden.shape[-1]))
            if pooled is None and getattr(output, "text_embeds", None) is not None:
                pooled = output.text_embeds[:1]
        return torch.cat(hidden_parts, dim=-1).to(self.dtype), pooled

    # ---------------------------------------------------------------- sampling

    def _sample(
        self,
        latents: torch.Tensor,
        seeds: list[int],
        conditioning: _Conditioning,
        settings: SamplingSettings,
        plan: DenoiseSchedule,
        mask: torch.Tensor | None,
        differential: bool,
        inpaint: _InpaintConditioning | None,
    ) -> torch.Tensor:
        """One KSampler call: the last ``steps`` steps of a ``floor(steps/denoise)`` schedule."""
        batch = latents.shape[0]
        spec = SAMPLERS[settings.sampler_name]
        # Stochastic schedulers that can't take one generator per sample (a Brownian tree seeded
        # through the config) get one scheduler instance per crop, stepped on its own slice.
        per_sample = spec.stochastic and not spec.per_sample_generators
        if per_sample:
            schedulers = [self._scheduler(settings, plan, seed) for seed in seeds]
        else:
            schedulers = [self._scheduler(settings, plan, None)]
        lead = schedulers[0]
        timesteps = lead.timesteps[lead.comfy_start :]
        # ComfyUI's noise: CPU randn per seed with the latent's shape, so it is device- and
        # batch-independent; ancestral/SDE noise gets its own generator from the same seed.
        noise = torch.stack(
            [torch.randn(latents.shape[1:], generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds]
        ).to(self.device)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        takes_generator = "generator" in inspect.signature(lead.step).parameters
        original = latents
        x = lead.add_noise(original, noise, timesteps[:1].repeat(batch))
        t_from = float(timesteps[0])
        step_mask = mask
        for t in timesteps:
            # Blend at step boundaries (not at a 2nd-order sampler's midpoint evaluation): outside
            # the mask the latent is the original at this step's noise level.
            if mask is not None and getattr(lead, "state_in_first_order", True):
                if differential:
                    # ComfyUI's DifferentialDiffusion: (mask >= threshold), threshold going from 1
                    # at the first executed step to 0 at t = 0. Unlike ComfyUI, mask-0 pixels stay
                    # out even where the last threshold reaches 0 (they are outside the mask).
                    threshold = float(t) / t_from if t_from > 0 else 0.0
                    step_mask = ((mask >= threshold) & (mask > 0)).to(mask.dtype)
                renoised = lead.add_noise(original, noise, t.reshape(1).repeat(batch))
                x = step_mask * x + (1.0 - step_mask) * renoised
            if per_sample:
                model_input = torch.cat([s.scale_model_input(x[i : i + 1], t) for i, s in enumerate(schedulers)])
            else:
                model_input = lead.scale_model_input(x, t)
            if inpaint is not None:
                model_input = torch.cat([model_input, inpaint.mask, inpaint.masked_image_latents], dim=1)
            prediction = self._predict(model_input, t, conditioning, settings.cfg)
            if per_sample:
                x = torch.cat(
                    [
                        s.step(
                            prediction[i : i + 1],
                            t,
                            x[i : i + 1],
                            return_dict=False,
                            **({"generator": generators[i]} if takes_generator else {}),
                        )[0]
                        for i, s in enumerate(schedulers)
                    ]
                )
            else:
                kwargs = {"generator": generators} if takes_generator else {}
                x = lead.step(prediction, t, x, return_dict=False, **kwargs)[0]
        if mask is not None:
            x = step_mask * x + (1.0 - step_mask) * original
        return x

    def _scheduler(self, settings: SamplingSettings, plan: DenoiseSchedule, seed: int | None) -> Any:
        """A fresh scheduler positioned at the first executed step (``comfy_start``)."""
        overrides = {"noise_sampler_seed": seed} if seed is not None else None
        scheduler = build_scheduler(
            self.components.scheduler_config, settings.sampler_name, settings.scheduler, overrides
        )
        grid_steps = set_timesteps(scheduler, plan.total_steps, device=self.device)
        # 2nd-order schedulers interleave their midpoints: step k starts at index k · order.
        scheduler.comfy_start = max(grid_steps - plan.executed_steps, 0) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(scheduler.comfy_start)
        return scheduler

    def _predict(
        self, model_input: torch.Tensor, t: torch.Tensor, conditioning: _Conditioning, cfg: float
    ) -> torch.Tensor:
        """Classifier-free guidance in one UNet batch [uncond, cond]; cond only when cfg == 1."""
        unet = self.components.unet
        if cfg == 1.0:
            inputs, context, added = model_input, conditioning.positive, conditioning.positive_added
        else:
            inputs = torch.cat([model_input, model_input])
            context = torch.cat([conditioning.negative, conditioning.positive])
            added = None
            if conditioning.positive_added is not None and conditioning.negative_added is not None:
                added = {
                    key: torch.cat([conditioning.negative_added[key], conditioning.positive_added[key]])
                    for key in conditioning.positive_added
                }
        output = unet(
            inputs.to(self.dtype), t, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False
        )[0].float()
        if cfg == 1.0:
            return output
        uncond, cond = output.chunk(2)
        return uncond + cfg * (cond - uncond)


# -------------------------------------------------------------------- helpers


def check_job(index: int, job: RefineJob) -> None:
    image = job.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"job {index}: image must be uint8 [H, W, 3], got {getattr(image, 'shape', None)}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"job {index}: empty image {image.shape}")
    if job.noise_mask is not None and job.noise_mask.shape != image.shape[:2]:
        raise ValueError(f"job {index}: noise_mask {job.noise_mask.shape} does not match image {image.shape[:2]}")


def _lora_key(loras: Sequence[tuple[str, float, float]]) -> tuple[tuple[str, float, float], ...]:
    return tuple((str(name), float(model), float(clip)) for name, model, clip in loras)


def _group(items: Sequence[Any], key: Any) -> dict[Any, list[int]]:
    """Indices of ``items`` grouped by ``key(item)``, groups and members in first-seen order."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[key(item)].append(index)
    return dict(groups)


def _pad_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Edge-replicate right/bottom to ``size`` so the VAE sees no artificial border."""
    pad_h, pad_w = size[0] - image.shape[0], size[1] - image.shape[1]
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else image


def _pad_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Zero padding: the padded area is never denoised."""
    mask = np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)
    return np.pad(mask, ((0, size[0] - mask.shape[0]), (0, size[1] - mask.shape[1])))


def _to_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC → float CHW in [-1, 1]."""
    return torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """float CHW in [0, 1] → uint8 HWC (rounded)."""
    return (image.permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def _token_windows(tokenizer: Any, text: str, length: int) -> list[list[int]]:
    """``text`` as 77-token windows: BOS + up to 75 tokens + EOS, padded with the pad token.

    A long chunk becomes several windows (ComfyUI does the same) instead of being truncated.
    """
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    size = length - 2
    pieces = [ids[start : start + size] for start in range(0, len(ids), size)] or [[]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [[tokenizer.bos_token_id, *piece, tokenizer.eos_token_id] + [pad] * (size - len(piece)) for piece in pieces]


def _repeat_to_common_length(embeds: list[torch.Tensor]) -> torch.Tensor:
    """Bring [1, L_i, D] embeddings to one length by repeating each whole sequence (ComfyUI's way).

    Cross-attention over a sequence repeated k times equals attention over the sequence itself
    (the softmax weights split evenly over the copies), so this changes nothing but the shape,
    unlike padding with an encoded empty prompt.
    """
    target = math.lcm(*(embed.shape[1] for embed in embeds))
    return torch.cat([embed.repeat(1, target // embed.shape[1], 1) for embed in embeds])
