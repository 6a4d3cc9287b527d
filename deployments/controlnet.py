"""ControlNets of the inpainter: named diffusers ``ControlNetModel`` s applied per crop at each UNet call.

Semantics are ComfyUI's ``ControlNetApplyAdvanced`` (``comfy/controlnet.py``):

- the ControlNet sees what the UNet sees: the c_in-scaled latent (4 channels; an inpainting
  UNet's extra channels are not its input), the discretised timestep, the row's text embedding
  (and SDXL's added conditions), and the control image (*hint*) in [0, 1] at 8× the latent size;
- its residuals are multiplied by ``strength`` and added to the UNet's skip connections and
  middle block, for the positive and the negative rows alike;
- only while the call's sigma is inside the window: ComfyUI skips the ControlNet when
  ``σ > percent_to_sigma(start_percent)`` or ``σ < percent_to_sigma(end_percent)``, with
  ``percent_to_sigma(p) = σ(999·(1 − p))`` on the model's full schedule (p ≤ 0 → ∞, p ≥ 1 → 0);
- strength 0 is no ControlNet (the node returns the conditioning unchanged): such a crop gets
  no ControlNet state at all, so its UNet calls are bit-identical to a crop without one.

Crops with different ControlNets, strengths and windows share one UNet call: each ControlNet
runs once on the rows that use it in this call, its residuals are scaled per row and scattered
into zero tensors over the whole batch (a row without control gets exact zeros: ``h + 0 = h``).

The hint: ComfyUI resizes the control image to the latent size × 8 (``nearest-exact`` after a
centre crop to the latent's aspect, ``common_upscale``). We pad the crop to the latent grid
instead of cutting it (Decision 5), so the hint is resized the same way to the upscaled crop's
size and edge-padded like the pixels the VAE encoded; for a crop whose size is a multiple of 8
this is ComfyUI's hint exactly, and a tile ControlNet's hint is the crop's own pixels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deployments.inpainter_loading import _hub_cache, _locate, _offline
from deployments.sampling import ModelSampling, UNetRequest
from deployments.sampling.inpaint import center_crop_to_aspect
from deployments.weights import CorruptWeightsError, WeightsNotFoundError
from facedetailer.controlnet import PREPROCESSORS, ControlHint

logger = logging.getLogger(__name__)

__all__ = ["ControlNetSet", "CropControl", "common_upscale_center", "load_controlnet_model"]


def load_controlnet_model(
    reference: str, *, single_file_config: str | None = None, dtype: torch.dtype, cache_dir: Path | None
) -> Any:
    """A diffusers folder (local or a cached HF repo id) or a single ``.safetensors`` file.

    References resolve like the inpainter's model (``tiny://``, ``pkg://``, URLs and hub files
    are fetched once into the cache); errors name the reference.
    """
    from diffusers import ControlNetModel

    path = _locate(reference, cache_dir)
    try:
        if path is None:  # a hub repo id: offline, only the local HF cache is consulted
            return ControlNetModel.from_pretrained(
                reference, torch_dtype=dtype, cache_dir=_hub_cache(cache_dir), local_files_only=_offline()
            )
        if path.is_dir():
            return ControlNetModel.from_pretrained(str(path), torch_dtype=dtype)
        kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": _offline()}
        if single_file_config is not None:
            config_path = _locate(single_file_config, cache_dir)
            kwargs["config"] = str(config_path) if config_path is not None else single_file_config
        return ControlNetModel.from_single_file(str(path), **kwargs)
    except (OSError, ValueError) as error:
        if path is None:
            raise WeightsNotFoundError(f"{reference}: not loadable as a ControlNet repo id: {error}") from error
        raise CorruptWeightsError(f"{path}: cannot be loaded as a ControlNet: {error}") from error


def common_upscale_center(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ComfyUI's ``common_upscale(image, width, height, "nearest-exact", "center")`` for [N, C, H, W]."""
    cut = center_crop_to_aspect(image, height, width)
    if tuple(cut.shape[-2:]) == (height, width):
        return cut
    return F.interpolate(cut, size=(height, width), mode="nearest-exact")


@dataclass(frozen=True)
class CropControl:
    """A crop's ControlNet state inside the engine (``crop.state["control"]``)."""

    name: str
    strength: float
    sigma_start: float  # the window's upper sigma (start_percent)
    sigma_end: float  # the window's lower sigma (end_percent)
    hint: torch.Tensor  # [1, 3, H, W] in [0, 1] on the device, 8× the latent grid

    def applies_at(self, sigma: float) -> bool:
        """ComfyUI's test: skipped when σ > start sigma or σ < end sigma."""
        return not (sigma > self.sigma_start or sigma < self.sigma_end)


@dataclass
class _LoadedControlNet:
    model: Any
    preprocessor: str
    source: str


class ControlNetSet:
    """The ControlNets one inpainter replica serves, by name (config ``args.controlnets``)."""

    def __init__(
        self,
        specs: Mapping[str, Mapping[str, Any]] | ControlNetSet | None,
        *,
        device: torch.device,
        dtype: torch.dtype,
        model_sampling: ModelSampling,
        cache_dir: Path | None = None,
    ) -> None:
        self.device, self.dtype, self.model_sampling = device, dtype, model_sampling
        self.models: dict[str, _LoadedControlNet] = {}
        if isinstance(specs, ControlNetSet):  # another checkpoint's: share the loaded ControlNets
            self.models = specs.models
            return
        for name, spec in (specs or {}).items():
            preprocessor = spec.get("preprocessor", "tile")
            if preprocessor not in PREPROCESSORS:
                raise ValueError(
                    f"controlnets.{name}: preprocessor must be one of {PREPROCESSORS}, got {preprocessor!r}"
                )
            model = load_controlnet_model(
                spec["model"], single_file_config=spec.get("single_file_config"), dtype=dtype, cache_dir=cache_dir
            )
            model.to(device).eval().requires_grad_(False)
            self.models[name] = _LoadedControlNet(model=model, preprocessor=preprocessor, source=str(spec["model"]))
            logger.info("controlnet %s loaded from %s (%s)", name, spec["model"], preprocessor)

    def __bool__(self) -> bool:
        return bool(self.models)

    def info(self) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "source": loaded.source,
                "preprocessor": loaded.preprocessor,
                "conditioning_channels": int(loaded.model.config.conditioning_channels),
                "cross_attention_dim": loaded.model.config.cross_attention_dim,
            }
            for name, loaded in self.models.items()
        }

    def check(self, index: int, hint: ControlHint | None, unet_config: Any) -> None:
        """Refuse an unknown name, a bad window or an unusable control image before any model work."""
        if hint is None:
            return
        if hint.name not in self.models:
            configured = ", ".join(self.models) or "none"
            raise ValueError(f"controlnet: unknown {hint.name!r}; configured: {configured}")
        if not 0.0 <= hint.start_percent <= hint.end_percent <= 1.0:
            raise ValueError(
                f"controlnet: need 0 <= start_percent <= end_percent <= 1, got {hint.start_percent}, {hint.end_percent}"
            )
        if not math.isfinite(hint.strength) or hint.strength < 0:
            raise ValueError(f"controlnet: strength must be finite and >= 0, got {hint.strength}")
        image = np.asarray(hint.image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(f"job {index}: control image must be uint8 [h, w, 3], got {image.shape}")
        model = self.models[hint.name].model
        if model.config.cross_attention_dim != unet_config.cross_attention_dim:
            raise ValueError(
                f"controlnet {hint.name!r} was made for cross_attention_dim {model.config.cross_attention_dim}, "
                f"this checkpoint has {unet_config.cross_attention_dim}"
            )

    # ---------------------------------------------------------------- per crop

    def prepare(
        self, hint: ControlHint | None, image_size: tuple[int, int], padded: tuple[int, int]
    ) -> CropControl | None:
        """The crop's ControlNet state: None without a ControlNet or at strength 0 (the node's no-op).

        ``image_size`` is the upscaled crop's (height, width), ``padded`` the latent grid × 8.
        """
        if hint is None or hint.strength == 0.0:
            return None
        pixels = torch.from_numpy(np.array(hint.image, copy=True)).permute(2, 0, 1)[None].float() / 255.0
        pixels = common_upscale_center(pixels, *image_size)
        pad_h, pad_w = padded[0] - image_size[0], padded[1] - image_size[1]
        if pad_h or pad_w:  # edge-replicate right/bottom, as the crop the VAE encoded
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h), mode="replicate")
        return CropControl(
            name=hint.name,
            strength=float(hint.strength),
            sigma_start=self.model_sampling.percent_to_sigma(hint.start_percent),
            sigma_end=self.model_sampling.percent_to_sigma(hint.end_percent),
            hint=pixels.to(self.device, self.dtype),
        )

    # ---------------------------------------------------------------- per UNet call

    def residuals(
        self,
        controls: Sequence[CropControl | None],
        requests: Sequence[UNetRequest],
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        added_conditions: dict[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        """The UNet's ControlNet keyword arguments for one batched call, or {} when no row uses one.

        ``controls[i]``/``requests[i]`` belong to the i-th crop of the call; its rows are the cond
        row and, when the request asks for it, the uncond row right after (the inpainter's order).
        """
        by_name: dict[str, list[tuple[int, CropControl]]] = {}
        row = 0
        for control, request in zip(controls, requests, strict=True):
            rows = 2 if request.uncond else 1
            if control is not None and control.applies_at(request.sigma):
                for offset in range(rows):
                    by_name.setdefault(control.name, []).append((row + offset, control))
            row += rows
        if not by_name:
            return {}
        down: list[torch.Tensor] | None = None
        middle: torch.Tensor | None = None
        for name, members in by_name.items():
            index = torch.tensor([position for position, _ in members], device=x.device)
            hints = torch.cat([control.hint for _, control in members])
            added = {key: value[index] for key, value in added_conditions.items()} if added_conditions else None
            down_part, middle_part = self.models[name].model(
                x[index].to(self.dtype),
                timesteps[index],
                encoder_hidden_states=context[index],
                controlnet_cond=hints,
                conditioning_scale=1.0,
                added_cond_kwargs=added,
                return_dict=False,
            )
            scale = torch.tensor([control.strength for _, control in members], device=x.device)
            if down is None:
                down = [torch.zeros((x.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
                        for part in down_part]  # fmt: skip
                middle = torch.zeros((x.shape[0], *middle_part.shape[1:]), dtype=middle_part.dtype, device=x.device)
            for full, part in zip(down, down_part, strict=True):
                full[index] = part * scale.to(part.dtype).view(-1, 1, 1, 1)
            middle[index] = middle_part * scale.to(middle_part.dtype).view(-1, 1, 1, 1)  # type: ignore[index]
        return {"down_block_additional_residuals": tuple(down or ()), "mid_block_additional_residual": middle}
