"""Euler-family samplers (k-diffusion's originals and ComfyUI's additions) as generators.

Each function follows the published algorithm step for step, in ComfyUI's order of operations
and noise draws, so that the same model gives the same latent. ``model(x, sigma)`` is a
:class:`~deployments.sampling.base.Denoiser`; every model evaluation is ``yield from model(...)``.
"""

from __future__ import annotations

import torch

from deployments.sampling.base import Denoiser, SamplerEnv, SamplerProcess, ancestral_step, to_d

__all__ = [
    "dpm_2",
    "dpm_2_ancestral",
    "dpm_2_ancestral_rf",
    "euler",
    "euler_ancestral",
    "euler_ancestral_rf",
    "heun",
    "heunpp2",
    "rf_ancestral_step",
]


def euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """Karras et al. (2022) Algorithm 2 with Euler steps (no churn)."""
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """Euler to σ_down, then fresh Gaussian noise of σ_up (eta 1); CONST models: the RF variant."""
    if env.model_sampling.is_const:
        return (yield from euler_ancestral_rf(model, x, sigmas, env))
    noise = env.gaussian_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = denoised
        else:
            d = to_d(x, sigmas[i], denoised)
            x = x + d * (sigma_down - sigmas[i]) + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """Karras et al. (2022) Algorithm 2: Heun's 2nd-order steps, Euler into sigma 0."""
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = yield from model(x_2, sigmas[i + 1])
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


def heunpp2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """Heun++ (sd-webui-samplers-scheduler): up to three evaluations per step, weighted by σ/σ_0."""
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            denoised_2 = yield from model(x_2, sigmas[i + 1])
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            denoised_2 = yield from model(x_2, sigmas[i + 1])
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            denoised_3 = yield from model(x_3, sigmas[i + 2])
            d_3 = to_d(x_3, sigmas[i + 2], denoised_3)
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            w1 = 1 - w2 - w3
            x = x + (w1 * d + w2 * d_2 + w3 * d_3) * dt
    return x


def dpm_2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """DPM-Solver-2 in Karras form: midpoint in log-sigma, Euler into sigma 0."""
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = yield from model(x_2, sigma_mid)
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigmas[i + 1] - sigmas[i])
    return x


def dpm_2_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """DPM-Solver-2 steps to σ_down, then fresh noise of σ_up; CONST models: the RF variant."""
    if env.model_sampling.is_const:
        return (yield from dpm_2_ancestral_rf(model, x, sigmas, env))
    noise = env.gaussian_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = yield from model(x_2, sigma_mid)
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


# ---------------------------------------------------------------------- rectified flow (CONST)


def rf_ancestral_step(
    sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(σ_down, α_next/α_down, renoise) of an ancestral step on x = (1 − σ)·x0 + σ·ε.

    σ_down = σ_next·(1 + (σ_next/σ − 1)·η); the step lands at σ_down and is rescaled by
    α_next/α_down (α = 1 − σ), then noise of std √(σ_next² − σ_down²·α_next²/α_down²) brings
    it to σ_next with the right marginal (ComfyUI's ``*_RF`` samplers).
    """
    downstep_ratio = 1 + (sigma_next / sigma - 1) * eta
    sigma_down = sigma_next * downstep_ratio
    alpha_next = 1 - sigma_next
    alpha_down = 1 - sigma_down
    renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_next / alpha_down, renoise


def euler_ancestral_rf(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, eta: float = 1.0, s_noise: float = 1.0
) -> SamplerProcess:
    """Euler ancestral for rectified flow: interpolate towards x0 to σ_down, rescale, renoise."""
    noise = env.gaussian_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        sigma_down, rescale, renoise = rf_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        ratio = sigma_down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised
        if eta > 0:
            x = rescale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


def dpm_2_ancestral_rf(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, eta: float = 1.0, s_noise: float = 1.0
) -> SamplerProcess:
    """DPM-Solver-2 ancestral for rectified flow: the midpoint step to σ_down, rescale, renoise."""
    noise = env.gaussian_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        sigma_down, rescale, renoise = rf_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        env.report(denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = yield from model(x_2, sigma_mid)
            x = x + to_d(x_2, sigma_mid, denoised_2) * (sigma_down - sigmas[i])
            x = rescale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x
