"""Sigma tables and schedules against numbers derived from the published formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sampling_helpers import k_diffusion_sampling, sd15

from deployments.sampling import ModelSampling, sigmas_for
from deployments.sampling.schedulers import calculate_sigmas, ksampler_sigmas


def test_sd15_table_matches_the_ddpm_betas():
    ms = sd15()
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    expected = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    np.testing.assert_allclose(ms.sigmas.numpy(), expected, rtol=1e-6)
    assert float(ms.sigma_min) == pytest.approx(0.029167, abs=1e-6)
    assert float(ms.sigma_max) == pytest.approx(14.614642, abs=1e-5)
    # the same table from alphas_cumprod
    other = ModelSampling.from_alphas_cumprod(torch.from_numpy(alphas_cumprod))
    assert torch.equal(other.sigmas, ms.sigmas)


def test_timestep_is_the_nearest_whole_timestep_in_log_sigma():
    ms = sd15()
    for t in (0, 1, 17, 500, 998, 999):
        assert int(ms.timestep(ms.sigmas[t])) == t
    # halfway in log-sigma between t=100 and t=101 (a hair towards 101) rounds to 101
    between = torch.exp(ms.log_sigmas[100] * 0.49 + ms.log_sigmas[101] * 0.51)
    assert int(ms.timestep(between)) == 101
    assert float(ms.sigma(torch.tensor(100.5))) == pytest.approx(
        math.exp((float(ms.log_sigmas[100]) + float(ms.log_sigmas[101])) / 2), rel=1e-6
    )


def test_eps_and_v_conversions():
    x = torch.full((1, 4, 2, 2), 3.0)
    out = torch.full((1, 4, 2, 2), 0.5)
    sigma = torch.tensor(2.0)
    eps = sd15()
    assert torch.allclose(eps.calculate_input(sigma, x), x / math.sqrt(5))
    assert torch.allclose(eps.calculate_denoised(sigma, out, x), x - out * 2.0)
    v = ModelSampling(eps.sigmas.double(), "v_prediction")
    assert torch.allclose(v.calculate_denoised(sigma, out, x), x / 5 - out * 2 / math.sqrt(5))
    latent = torch.ones_like(x)
    assert torch.allclose(eps.noise_scaling(sigma, x, latent), x * 2 + 1)
    assert torch.allclose(eps.noise_scaling(sigma, x, latent, max_denoise=True), x * math.sqrt(5) + 1)


def test_karras_and_exponential_match_k_diffusion():
    kd = k_diffusion_sampling()
    ms = sd15()
    low, high = float(ms.sigma_min), float(ms.sigma_max)
    for n in (1, 4, 13):
        assert torch.equal(calculate_sigmas(ms, "karras", n), kd.get_sigmas_karras(n, low, high))
        assert torch.equal(calculate_sigmas(ms, "exponential", n), kd.get_sigmas_exponential(n, low, high))


def test_normal_simple_sgm_ddim_grids_in_timesteps():
    ms = sd15()
    table = ms.sigmas.double()
    # normal: t = linspace(999, 0, T), then 0
    expected = [float(ms.sigma(torch.tensor(t))) for t in np.linspace(999, 0, 7, dtype=np.float32)] + [0.0]
    assert calculate_sigmas(ms, "normal", 7).tolist() == pytest.approx(expected, rel=1e-6)
    # simple with 1000 % T != 0: t = 999 − int(i · 1000 / T)
    sigmas = calculate_sigmas(ms, "simple", 7)
    assert sigmas.tolist() == pytest.approx([float(table[999 - int(i * 1000 / 7)]) for i in range(7)] + [0], rel=1e-6)
    # sgm_uniform: linspace(999, 0, T + 1)[:-1]
    grid = np.linspace(999, 0, 8, dtype=np.float32)[:-1]
    assert calculate_sigmas(ms, "sgm_uniform", 7).tolist() == pytest.approx(
        [float(ms.sigma(torch.tensor(t))) for t in grid] + [0.0], rel=1e-6
    )
    # ddim_uniform: 1, 1 + k, … (k = 1000 // T) reversed, then 0 — 7 does not divide 1000: 8 steps
    ddim = calculate_sigmas(ms, "ddim_uniform", 7)
    assert ddim.tolist() == pytest.approx([float(table[t]) for t in range(1, 1000, 142)][::-1] + [0.0], rel=1e-6)
    assert len(ddim) == 9


def test_beta_linear_quadratic_kl_optimal():
    ms = sd15()
    # beta: ComfyUI's published 12-step values start 14.6, 12.3, 8.7, 5.7, 3.7, 2.4
    beta = calculate_sigmas(ms, "beta", 12)
    assert beta[:6].tolist() == pytest.approx([14.61, 12.3, 8.7, 5.7, 3.7, 2.4], abs=0.06)
    assert float(beta[-1]) == 0.0 and (beta[:-1] > beta[1:]).all()
    lq = calculate_sigmas(ms, "linear_quadratic", 4)
    # steps 4: linear part 0, 0.0125; quadratic part (i = 2, 3) 0.025, 0.275; then 1 → sigma 0
    assert lq.tolist() == pytest.approx(
        [14.6146, 14.6146 * (1 - 0.0125), 14.6146 * (1 - 0.025), 14.6146 * (1 - 0.275), 0.0], rel=1e-4
    )
    kl = calculate_sigmas(ms, "kl_optimal", 5)
    a_min, a_max = math.atan(float(ms.sigma_min)), math.atan(float(ms.sigma_max))
    expected = [math.tan(p * a_min + (1 - p) * a_max) for p in np.linspace(0, 1, 5)] + [0.0]
    assert kl.tolist() == pytest.approx(expected, rel=1e-5)


def test_denoise_truncation_and_penultimate_discard():
    ms = sd15()
    full = calculate_sigmas(ms, "karras", 40)
    assert torch.equal(ksampler_sigmas(ms, "karras", 20, 0.5), full[-21:])
    assert torch.equal(ksampler_sigmas(ms, "karras", 20, 0.99995), calculate_sigmas(ms, "karras", 20))
    # int(7 / 0.07) = 99 (7/0.07 = 99.999…), as ComfyUI computes it
    assert torch.equal(ksampler_sigmas(ms, "normal", 7, 0.07), calculate_sigmas(ms, "normal", 99)[-8:])
    discarded = sigmas_for(ms, "dpm_2", "normal", 4, 1.0)
    five = calculate_sigmas(ms, "normal", 5)
    assert torch.equal(discarded, torch.cat([five[:-2], five[-1:]]))
    assert len(discarded) == 5
