"""LMS, the DPM-Solver++ family, DDPM and LCM as generators (k-diffusion / ComfyUI algorithms).

SDE variants draw their noise from a Brownian tree (``env.brownian_noise``; on the CPU unless the
``*_gpu`` variant), the ancestral ones from the seeded Gaussian generator (``env.gaussian_noise``),
in the same order as ComfyUI so a seed gives the same latent.
"""

from __future__ import annotations

from functools import partial

import torch
from scipy import integrate

from deployments.sampling.base import (
    Denoiser,
    SamplerEnv,
    SamplerProcess,
    ancestral_step,
    half_log_snr,
    model_half_log_snr,
    model_sigma_from_half_log_snr,
    offset_first_sigma,
    sigma_from_half_log_snr,
    to_d,
)
from deployments.sampling.noise import NoiseSampler
from deployments.sampling.samplers_euler import rf_ancestral_step

__all__ = [
    "ddpm",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_rf",
    "dpmpp_3m_sde",
    "dpmpp_sde",
    "lcm",
    "lms",
]


def _lms_coefficient(order: int, t: object, i: int, j: int) -> float:
    """∫ of the j-th Lagrange basis polynomial over [t_i, t_{i+1}] (k-diffusion's quadrature)."""

    def basis(tau: float) -> float:
        product = 1.0
        for k in range(order):
            if k != j:
                product *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return product

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def lms(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, order: int = 4) -> SamplerProcess:
    """Linear multistep on the Karras ODE, order up to 4, coefficients by quadrature."""
    sigmas_cpu = sigmas.detach().cpu().numpy()
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        history.append(to_d(x, sigmas[i], denoised))
        if len(history) > order:
            history.pop(0)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            current = min(i + 1, order)
            coefficients = [_lms_coefficient(current, sigmas_cpu, i, j) for j in range(current)]
            x = x + sum(c * d for c, d in zip(coefficients, reversed(history), strict=False))
    return x


def dpmpp_2s_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """DPM-Solver++(2S) single-step to σ_down, then ancestral noise; CONST models: the RF variant."""
    if env.model_sampling.is_const:
        return (yield from dpmpp_2s_ancestral_rf(model, x, sigmas, env))
    noise = env.gaussian_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = half_log_snr(sigmas[i]), half_log_snr(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_from_half_log_snr(s) / sigma_from_half_log_snr(t)) * x - (-h * 0.5).expm1() * denoised
            denoised_2 = yield from model(x_2, sigma_from_half_log_snr(s))
            x = (sigma_from_half_log_snr(t_next) / sigma_from_half_log_snr(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
    return x


def dpmpp_2s_ancestral_rf(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, eta: float = 1.0, s_noise: float = 1.0
) -> SamplerProcess:
    """DPM-Solver++(2S) ancestral for rectified flow: λ = log((1 − σ)/σ), interpolation steps
    towards x0 to the midpoint and to σ_down, then ComfyUI's RF rescale and renoise."""
    noise = env.gaussian_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        sigma_down, rescale, renoise = rf_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        env.report(denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            if sigmas[i] == 1.0:
                sigma_s = 0.9999  # λ(1) = −∞: ComfyUI's fixed first midpoint
            else:
                lambda_i, lambda_down = ((1 - sigmas[i]) / sigmas[i]).log(), ((1 - sigma_down) / sigma_down).log()
                s = lambda_i + 0.5 * (lambda_down - lambda_i)
                sigma_s = (s.exp() + 1) ** -1
            ratio = sigma_s / sigmas[i]
            u = ratio * x + (1 - ratio) * denoised
            denoised_2 = yield from model(u, sigma_s)
            ratio = sigma_down / sigmas[i]
            x = ratio * x + (1 - ratio) * denoised_2
        if sigmas[i + 1] > 0 and eta > 0:
            x = rescale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


def dpmpp_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    env: SamplerEnv,
    cpu_tree: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> SamplerProcess:
    """DPM-Solver++ (stochastic, 2 evaluations per step) with Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    noise = env.brownian_noise(x, sigmas, cpu=cpu_tree)
    ms = env.model_sampling
    sigmas = offset_first_sigma(ms, sigmas)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = model_half_log_snr(ms, sigmas[i]), model_half_log_snr(ms, sigmas[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = model_sigma_from_half_log_snr(ms, lambda_s_1)
        alpha_s = sigmas[i] * lambda_s.exp()
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        # step 1, to the intermediate point, with its share of the noise
        sd, su = ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s_1 * noise(sigmas[i], sigma_s_1) * s_noise * su
        denoised_2 = yield from model(x_2, sigma_s_1)
        # step 2, the whole step with the blended prediction
        sd, su = ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
        h_ = sd.log().neg() - lambda_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


def dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """DPM-Solver++(2M): 2nd-order multistep in log-sigma, 1st order at the ends."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        t, t_next = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
        h = t_next - t
        ratio = sigma_from_half_log_snr(t_next) / sigma_from_half_log_snr(t)
        if old_denoised is None or sigmas[i + 1] == 0:
            x = ratio * x - (-h).expm1() * denoised
        else:
            r = (t - half_log_snr(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = ratio * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def _sde_noise_term(noise: NoiseSampler, sigmas: torch.Tensor, i: int, h: torch.Tensor, eta: float) -> torch.Tensor:
    return noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * 1.0


def dpmpp_2m_sde(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    env: SamplerEnv,
    solver_type: str = "midpoint",
    cpu_tree: bool = True,
    eta: float = 1.0,
) -> SamplerProcess:
    """DPM-Solver++(2M) SDE (midpoint or heun correction) with Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    noise = env.brownian_noise(x, sigmas, cpu=cpu_tree)
    ms = env.model_sampling
    sigmas = offset_first_sigma(ms, sigmas)
    old_denoised = None
    h = h_last = None
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = model_half_log_snr(ms, sigmas[i]), model_half_log_snr(ms, sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0:
                x = x + _sde_noise_term(noise, sigmas, i, h, eta)
        old_denoised = denoised
        h_last = h
    return x


def dpmpp_3m_sde(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, cpu_tree: bool = True, eta: float = 1.0
) -> SamplerProcess:
    """DPM-Solver++(3M) SDE with Brownian-tree noise."""
    if len(sigmas) <= 1:
        return x
    noise = env.brownian_noise(x, sigmas, cpu=cpu_tree)
    ms = env.model_sampling
    sigmas = offset_first_sigma(ms, sigmas)
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = model_half_log_snr(ms, sigmas[i]), model_half_log_snr(ms, sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta > 0:
                x = x + _sde_noise_term(noise, sigmas, i, h, eta)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _ddpm_step(
    x: torch.Tensor, sigma: torch.Tensor, sigma_prev: torch.Tensor, eps: torch.Tensor, noise: NoiseSampler
) -> torch.Tensor:
    """One ancestral DDPM step in the VP view (x already divided by √(1 + σ²))."""
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
    alpha = alpha_cumprod / alpha_cumprod_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
    if sigma_prev > 0:
        variance = (1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)
        mu = mu + variance.sqrt() * noise(sigma, sigma_prev)
    return mu


def ddpm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """Ancestral DDPM (Ho et al. 2020) on ComfyUI's sigma grid."""
    noise = env.gaussian_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        x = _ddpm_step(
            x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1], (x - denoised) / sigmas[i], noise
        )
        if sigmas[i + 1] != 0:
            x = x * torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


def lcm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """LCM multistep sampling: jump to the prediction, re-noise to the next sigma."""
    noise = env.gaussian_noise(x)
    for i in range(max(1, len(sigmas) - 1)):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = env.model_sampling.noise_scaling(sigmas[i + 1], noise(sigmas[i], sigmas[i + 1]), x)
    return x


# The *_gpu variants only move the Brownian tree to the model's device.
dpmpp_sde_gpu = partial(dpmpp_sde, cpu_tree=False)
dpmpp_2m_sde_gpu = partial(dpmpp_2m_sde, cpu_tree=False)
dpmpp_2m_sde_heun = partial(dpmpp_2m_sde, solver_type="heun")
dpmpp_2m_sde_heun_gpu = partial(dpmpp_2m_sde, solver_type="heun", cpu_tree=False)
dpmpp_3m_sde_gpu = partial(dpmpp_3m_sde, cpu_tree=False)
