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


def _snap(query: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's dpmpp_sde asks the tree at exp(−(−log σ_i)) where ComfyUI asks at σ_i itself.

    Brownian increments are rough (a 1e-7 shift of an end point moves them by ~3e-4), so the
    reference's round-tripped sigmas are snapped back to the schedule's values.
    """
    nearest = sigmas[(sigmas - query).abs().argmin()]
    return nearest if abs(float(nearest) - float(query)) <= 1e-5 * float(query) else query


def reference(name: str, sigmas: torch.Tensor, latent: torch.Tensor, cfg: float, toy: ToyDenoiser) -> torch.Tensor:
    kd = k_diffusion_sampling()
    x = start_latent(sigmas, latent)
    model = toy.k_model(cfg)
    kwargs = {"disable": True}
    if "ancestral" in name:
        kwargs["noise_sampler"] = gaussian_noise(x, SEED)
    if "sde" in name:  # k-diffusion's own Brownian tree, seeded as ComfyUI seeds it
        tree = kd.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEED)
        kwargs["noise_sampler"] = lambda a, b: tree(_snap(a, sigmas), _snap(b, sigmas))
    if name in ("dpm_fast", "dpm_adaptive"):  # ComfyUI: from sigmas[0] to the last non-zero sigma
        sigma_min = sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]
        if name == "dpm_fast":
            return kd.sample_dpm_fast(model, x, sigma_min, sigmas[0], len(sigmas) - 1, **kwargs)
        return kd.sample_dpm_adaptive(model, x, sigma_min, sigmas[0], **kwargs)
    if name == "lms":  # ComfyUI's one change: the step into sigma 0 returns the prediction itself
        x = kd.sample_lms(model, x, sigmas[:-1], **kwargs)
        return model(x, sigmas[-2:-1])
    return getattr(kd, f"sample_{name}")(model, x, sigmas, **kwargs)


K_DIFFUSION_SAMPLERS = [
    "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive",
    "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde",
]  # fmt: skip


@pytest.mark.parametrize("name", K_DIFFUSION_SAMPLERS)
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


# cfg++ samplers step with the unguided prediction and add the guidance back; with a model whose
# negative prediction equals its positive one there is nothing to add, so each must reduce to its
# base sampler (up to α = σ·e^{−log σ} ≈ 1 in float32).
CFG_PP_BASES = {
    "euler_cfg_pp": "euler",
    "euler_ancestral_cfg_pp": "euler_ancestral",
    "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral",
    "dpmpp_2m_cfg_pp": "dpmpp_2m",
    "res_multistep_cfg_pp": "res_multistep",
    "res_multistep_ancestral_cfg_pp": "res_multistep_ancestral",
    "gradient_estimation_cfg_pp": "gradient_estimation",
}


@pytest.mark.parametrize("name", sorted(CFG_PP_BASES))
def test_cfg_pp_without_guidance_is_the_base_sampler(name):
    ms = sd15()
    toy = ToyDenoiser(SHAPE)
    toy.uncond_target = toy.target  # uncond prediction == cond prediction
    latent = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    options = dict(scheduler="karras", steps=6, denoise=0.7, cfg=5.0, seed=SEED, latent_image=latent)
    ours = sample(toy, ms, sampler_name=name, **options)
    base = sample(toy, ms, sampler_name=CFG_PP_BASES[name], **options)
    torch.testing.assert_close(ours, base, rtol=1e-4, atol=1e-4)
    # and with a real negative prediction the two differ (the guidance is used differently)
    toy = ToyDenoiser(SHAPE)
    assert (
        sample(toy, ms, sampler_name=name, **options) - sample(toy, ms, sampler_name=CFG_PP_BASES[name], **options)
    ).abs().max() > 1e-3


def test_exp_heun_2_x0_is_the_exponential_heun_step():
    """x_{t} = (σ_t/σ_s)·x − α_t[(φ₁ − φ₂)·D(x_s) + φ₂·D(x̃)], x̃ the exponential Euler point, h in log-SNR."""
    ms = sd15()
    toy = ToyDenoiser(SHAPE)
    latent = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    options = dict(scheduler="karras", steps=4, denoise=1.0, cfg=1.0, seed=SEED, latent_image=latent)
    ours = sample(toy, ms, sampler_name="exp_heun_2_x0", **options)
    sigmas = sigmas_for(ms, "exp_heun_2_x0", "karras", 4, 1.0).double()
    x = start_latent(sigmas.float(), latent).double()
    for i in range(len(sigmas) - 1):
        s, t = sigmas[i], sigmas[i + 1]
        d_s = toy.predict(x, s, toy.target.double())
        if t == 0:
            x = d_s
            continue
        h = math.log(s) - math.log(t)  # λ_t − λ_s with λ = −log σ
        phi_1 = math.expm1(-h)
        phi_2 = (math.expm1(-h) + h) / -h
        euler = t / s * x - phi_1 * d_s  # α = 1 in the VE view
        d_t = toy.predict(euler, t, toy.target.double())
        x = t / s * x - ((phi_1 - phi_2) * d_s + phi_2 * d_t)
    torch.testing.assert_close(ours.double(), x, rtol=1e-4, atol=1e-4)
    assert (ours - sample(toy, ms, sampler_name="heun", **options)).abs().max() > 1e-4
