"""Update rules against k-diffusion (the published upstream of ComfyUI's samplers).

Each sampler here is driven through our generator machinery (cfg, Denoiser, noise scaling) with
a toy denoiser and compared with k-diffusion's function on the same denoiser, sigmas, start latent
and noise source. A wrong coefficient, a skipped midpoint or a misplaced noise draw shows up as an
O(1e-2..1) difference; float32 round-off stays below 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch
from sampling_helpers import ToyDenoiser, k_diffusion_sampling, sd15

from deployments.sampling import sample, sigmas_for
from deployments.sampling.noise import gaussian_noise, initial_noise

SHAPE = (1, 4, 8, 8)
SEED = 77


def start_latent(sigmas: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    ms = sd15()
    noise = initial_noise(latent.shape, SEED)
    max_denoise = math.isclose(float(ms.sigma_max), float(sigmas[0]), rel_tol=1e-5)
    return ms.noise_scaling(sigmas[0], noise, latent, max_denoise)


def reference(name: str, sigmas: torch.Tensor, latent: torch.Tensor, cfg: float, toy: ToyDenoiser) -> torch.Tensor:
    kd = k_diffusion_sampling()
    x = start_latent(sigmas, latent)
    model = toy.k_model(cfg)
    function = getattr(kd, f"sample_{name}")
    kwargs = {"disable": True}
    if "ancestral" in name:
        kwargs["noise_sampler"] = gaussian_noise(x, SEED)
    return function(model, x, sigmas, **kwargs)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral"])
@pytest.mark.parametrize(
    ("scheduler", "steps", "denoise"), [("karras", 6, 1.0), ("normal", 5, 0.5), ("simple", 3, 0.3)]
)
def test_matches_k_diffusion(name, scheduler, steps, denoise):
    ms = sd15()
    toy = ToyDenoiser(SHAPE)
    latent = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * 0.8
    cfg = 3.5
    sigmas = sigmas_for(ms, name, scheduler, steps, denoise)
    ours = sample(toy, ms, sampler_name=name, scheduler=scheduler, steps=steps, denoise=denoise, cfg=cfg,
                  seed=SEED, latent_image=latent)  # fmt: skip
    expected = reference(name, sigmas, latent, cfg, toy)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # and the run actually moved: far from both the start latent and the plain input
    assert (ours - latent).abs().max() > 1e-2
