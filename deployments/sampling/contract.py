"""The types the inpainter engine and a crop's sampling process exchange (see the package doc)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

__all__ = ["CropProcess", "UNetRequest", "UNetResponse", "UnsupportedSamplerError"]


class UnsupportedSamplerError(ValueError):
    """A sampler/scheduler name or setting we cannot run exactly as ComfyUI does (HTTP 422)."""


@dataclass(frozen=True)
class UNetRequest:
    """One model evaluation a crop's sampler needs."""

    x_in: torch.Tensor  # [1, C, h, w] the UNet's latent input: mask blending and c_in already applied
    timestep: float  # ComfyUI's discretised timestep for this call (what the UNet receives)
    sigma: float  # this call's sigma (ControlNet start/end percent, logging)
    uncond: bool  # also evaluate the negative conditioning (False at the cfg=1 shortcut)


@dataclass(frozen=True)
class UNetResponse:
    cond: torch.Tensor  # raw UNet output for the positive conditioning, shape of x_in
    uncond: torch.Tensor | None = None  # raw output for the negative, when requested


# Yields UNetRequests, is sent UNetResponses, returns the final latent [1, C, h, w].
CropProcess = Generator[UNetRequest, UNetResponse, torch.Tensor]
