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
    # what the model receives, ModelSampling.timestep(σ): discrete, the whole timestep nearest in
    # log-sigma; discrete_flow, σ·multiplier (SD3: 0…1000; Flux.1 schnell: σ); flux, σ itself
    timestep: float
    sigma: float  # this call's sigma (ControlNet start/end percent, logging)
    uncond: bool  # also evaluate the negative conditioning (False at the cfg=1 shortcut)


@dataclass(frozen=True)
class UNetResponse:
    cond: torch.Tensor  # raw model output (eps, v or flow velocity) for the positive conditioning, shape of x_in
    uncond: torch.Tensor | None = None  # raw output for the negative, when requested


# Yields UNetRequests, is sent UNetResponses, returns the final latent [1, C, h, w].
CropProcess = Generator[UNetRequest, UNetResponse, torch.Tensor]
