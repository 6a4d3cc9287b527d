"""Noise as ComfyUI draws it: initial latent noise, per-step ancestral noise, Brownian-tree noise.

- Initial noise: CPU ``torch.randn`` of the latent's shape from a generator seeded with the seed
  (``comfy.sample.prepare_noise``), so it is the same on every device.
- Ancestral / SDE-with-Gaussian-noise samplers (euler_ancestral, ddpm, lcm, er_sde, …): a
  generator on the model's device seeded with the seed (``default_noise_sampler``), one
  ``randn`` of x's shape per call. On CPU the seed is incremented by one first (ComfyUI PR #11528,
  fixing issue #9819): otherwise the first ancestral draw is exactly the initial noise.
- Brownian-tree samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde): a
  ``torchsde.BrownianTree`` over [sigma_min, sigma_max] of the run with the seed as entropy,
  built on the CPU (``*_gpu`` variants: on the model's device); a step's noise is the tree's
  increment over [σ, σ_next] divided by √|σ_next − σ|.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

# torchsde warns when a float32 sigma lands a rounding error outside the tree's float64 interval
# (ComfyUI's runs print the same); the query is still answered at the interval's end.
warnings.filterwarnings("ignore", message="Should have (ta>=t0|tb<=t1)", category=UserWarning)

__all__ = [
    "NoiseSampler",
    "SEED_MODULUS",
    "brownian_tree_noise",
    "gaussian_noise",
    "initial_noise",
    "inpaint_random_noise",
]

SEED_MODULUS = 2**64

# A step's noise for the interval sigma → sigma_next, shaped like the latent.
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def initial_noise(shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """``prepare_noise``: CPU float32 randn of the latent shape from ``manual_seed(seed)``."""
    generator = torch.Generator("cpu").manual_seed(int(seed) % SEED_MODULUS)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device="cpu")


def inpaint_random_noise(shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """ComfyUI's ``ddim`` re-noises the area outside the mask with CPU noise from seed + 1."""
    return initial_noise(shape, (int(seed) + 1) % SEED_MODULUS)


def gaussian_noise(x: torch.Tensor, seed: int) -> NoiseSampler:
    """``default_noise_sampler``: a generator on x's device; seed + 1 on CPU (PR #11528).

    ComfyUI would overflow for seed + 1 = 2**64 on CPU; we wrap to 0 instead.
    """
    device = x.device
    if device.type == "cpu":
        seed = int(seed) + 1
    generator = torch.Generator(device=device).manual_seed(int(seed) % SEED_MODULUS)
    shape, dtype = x.shape, x.dtype

    def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)

    return draw


def brownian_tree_noise(
    x: torch.Tensor, sigma_min: torch.Tensor, sigma_max: torch.Tensor, seed: int, cpu: bool = True
) -> NoiseSampler:
    """``BrownianTreeNoiseSampler`` with a single seed: unit-variance noise for [σ, σ_next]."""
    import torchsde  # imported lazily: only the SDE samplers need it

    t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
    sign = 1
    if not t0 < t1:
        t0, t1, sign = t1, t0, -1
    w0 = torch.zeros_like(x)
    if cpu:
        t0, w0, t1 = t0.detach().cpu(), w0.detach().cpu(), t1.detach().cpu()
    tree = torchsde.BrownianTree(t0, w0, t1, entropy=int(seed) % SEED_MODULUS)
    device = x.device

    def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, order = (a, b, 1) if a < b else (b, a, -1)
        out_dtype = low.dtype
        if cpu:
            low, high = low.detach().cpu().float(), high.detach().cpu().float()
        increment = tree(low, high).to(device=device, dtype=out_dtype) * (sign * order)
        return increment / (b - a).abs().sqrt()

    return draw
