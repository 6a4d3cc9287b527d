"""Shared pieces of the sampling tests: the SD 1.x noise table, toy denoisers, k-diffusion loading.

k-diffusion (crowsonkb, MIT) is the published upstream of ComfyUI's samplers; its ``sampling``
module is loaded on its own (the package ``__init__`` pulls training-only dependencies such as
wandb and CLIP, which are not installed: see the Makefile).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from deployments.sampling import ModelSampling

SD15_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def sd15() -> ModelSampling:
    return ModelSampling.from_scheduler_config(SD15_CONFIG)


def k_diffusion_sampling() -> types.ModuleType:
    """``k_diffusion.sampling`` without executing ``k_diffusion/__init__``; skip if not installed."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (make venv installs it)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = package
    # sampling only needs utils.append_dims; the real utils module imports torchvision and PIL.
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, ndim: x[(...,) + (None,) * (ndim - x.ndim)]
    sys.modules["k_diffusion.utils"] = package.utils = utils
    module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{package.__path__[0]}/sampling.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["k_diffusion.sampling"] = package.sampling = module
    module_spec.loader.exec_module(module)
    return sys.modules["k_diffusion.sampling"]


class ToyDenoiser:
    """A deterministic, smooth, non-linear denoiser D(x, σ) with distinct cond/uncond predictions.

    D pulls x towards a target pattern, less as σ grows, depends on neighbouring cells, so every
    sampler's arithmetic shows up in the result (a constant or input-echo bug would not pass).
    """

    def __init__(self, shape: tuple[int, ...] = (1, 4, 8, 8), seed: int = 1234) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.target = torch.randn(shape, generator=generator)
        self.uncond_target = torch.randn(shape, generator=generator) * 0.5
        self.calls = 0

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip = 1.0 / (sigma**2 + 1.0)
        c_out = sigma / (sigma**2 + 1.0) ** 0.5
        # neighbours matter (as in a UNet): a mask's surroundings influence what is inside it
        mixed = (x + x.roll(1, dims=-1) + x.roll(1, dims=-2)) / 3
        return c_skip * x + (1.0 - c_skip) * (target + 0.1 * torch.tanh(mixed * c_out))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, need_uncond: bool):
        self.calls += 1
        cond = self.predict(x, sigma, self.target)
        return cond, (self.predict(x, sigma, self.uncond_target) if need_uncond else None)

    def k_model(self, cfg: float = 1.0):
        """The same denoiser as k-diffusion calls it: model(x, sigma_batch) → cfg-combined x0."""

        def model(x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
            cond = self.predict(x, sigma, self.target)
            if cfg == 1.0:
                return cond
            uncond = self.predict(x, sigma, self.uncond_target)
            return uncond + (cond - uncond) * cfg

        return model


class FlowToyDenoiser(ToyDenoiser):
    """The toy denoiser for a rectified-flow model (x = (1 − σ)·x0 + σ·ε, σ ∈ [0, 1]).

    Its x0 prediction is the Gaussian posterior mean a(σ)·x for unit-variance data, pulled towards
    a target pattern as σ grows, with a neighbour-dependent non-linear term, as the eps toy.
    """

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a = (1 - sigma) / ((1 - sigma) ** 2 + sigma**2)
        mixed = (x + x.roll(1, dims=-1) + x.roll(1, dims=-2)) / 3
        return a * x + (1 - a * (1 - sigma)) * (target + 0.1 * torch.tanh(mixed))
