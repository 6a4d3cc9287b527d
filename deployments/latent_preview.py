"""Cheap previews of a latent while it is sampled: a fixed linear latent → RGB map, no model.

The way ComfyUI's ``Latent2RGB`` previewer works (``latent_preview.py``): each pixel of the x0
latent (the model's latent space, i.e. VAE latent × scaling factor, shifted for SD3/Flux) is
multiplied by a per-format ``channels × 3`` matrix, a bias is added, and the result, taken as
[-1, 1], becomes 8-bit RGB. One pixel per latent cell: a 512×512 crop gives a 64×64 preview.

The factors are data, one :class:`LatentRGB` per latent format in :data:`LATENT_RGB` (the values
of ComfyUI's ``comfy/latent_formats.py``, ``latent_rgb_factors`` and ``latent_rgb_factors_bias``).
A new model family adds its row there and says which format it uses in :func:`latent_format_of`;
SD3 and Flux latents have 16 channels, so their matrices have 16 rows (see the table's note).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["LATENT_RGB", "LatentRGB", "latent_format_of", "latent_preview", "preview_extent"]


@dataclass(frozen=True)
class LatentRGB:
    """A latent format's linear map: ``rgb = latent · factors + bias``, then [-1, 1] → [0, 255]."""

    factors: tuple[tuple[float, float, float], ...]  # one (R, G, B) row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def channels(self) -> int:
        return len(self.factors)


# ComfyUI's factors (comfy/latent_formats.py). SD 2.x uses the SD 1.x VAE and so the "sd15" map.
# To add a 16-channel format (SD3, Flux), add its 16 rows and its bias here under its name and
# return that name from latent_format_of for the family's components.
LATENT_RGB: dict[str, LatentRGB] = {
    "sd15": LatentRGB(
        factors=(
            (0.3512, 0.2297, 0.3227),
            (0.3250, 0.4974, 0.2350),
            (-0.2829, 0.1762, 0.2721),
            (-0.2120, -0.2616, -0.7177),
        ),
    ),
    "sdxl": LatentRGB(
        factors=(
            (0.3651, 0.4232, 0.4341),
            (-0.2533, -0.0042, 0.1068),
            (0.1076, 0.1111, -0.0362),
            (-0.3165, -0.2492, -0.2188),
        ),
        bias=(0.1084, -0.0175, -0.0011),
    ),
}


def latent_format_of(components: Any) -> str:
    """The :data:`LATENT_RGB` key of a loaded checkpoint (``SDComponents``): its latent space."""
    return "sdxl" if getattr(components, "is_sdxl", False) else "sd15"


def preview_extent(image_shape: tuple[int, ...], vae_scale_factor: int) -> tuple[int, int]:
    """The latent cells (rows, columns) an image of ``image_shape`` covers; the rest is padding."""
    return math.ceil(image_shape[0] / vae_scale_factor), math.ceil(image_shape[1] / vae_scale_factor)


def latent_preview(latent: torch.Tensor, latent_format: str, extent: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [h, w, 3] RGB of the first latent of ``latent`` [n, C, H, W] (cut to ``extent`` cells).

    ComfyUI's arithmetic: ``linear(x0, factors, bias)``, then ``((x + 1) / 2).clamp(0, 1) · 255``
    truncated to uint8. Raises ``ValueError`` when the format is unknown or its channel count is
    not the latent's.
    """
    mapping = LATENT_RGB.get(latent_format)
    if mapping is None:
        raise ValueError(f"no latent → RGB preview map for latent format {latent_format!r}")
    if latent.shape[1] != mapping.channels:
        raise ValueError(
            f"latent format {latent_format!r} has {mapping.channels} channels, the latent {latent.shape[1]}"
        )
    x0 = latent[0]
    if extent is not None:
        x0 = x0[:, : extent[0], : extent[1]]
    factors = torch.tensor(mapping.factors, dtype=x0.dtype, device=x0.device)  # [C, 3]
    bias = torch.tensor(mapping.bias, dtype=x0.dtype, device=x0.device)
    rgb = torch.nn.functional.linear(x0.movedim(0, -1), factors.T, bias)  # [h, w, 3]
    scaled = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0)
    return scaled.to(device="cpu", dtype=torch.uint8).numpy()
