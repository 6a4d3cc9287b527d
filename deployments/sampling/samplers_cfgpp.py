"""CFG++ samplers (Chung et al. 2024), RES multistep and gradient estimation, as generators.

CFG++ steps renoise with the *unguided* prediction: they read ``model.uncond_denoised`` after each
call (ComfyUI's post-cfg hook), which is why their registry entries set ``needs_uncond`` (the
uncond is evaluated even at cfg = 1). That prediction is taken before the noise mask replaces
the guided one, exactly as in ComfyUI.
"""

from __future__ import annotations

import torch

from deployments.sampling.base import (
    Denoiser,
    SamplerEnv,
    SamplerProcess,
    ancestral_step,
    half_log_snr,
    model_half_log_snr,
    sigma_from_half_log_snr,
    to_d,
)

__all__ = [
    "dpmpp_2m_cfg_pp",
    "dpmpp_2s_ancestral_cfg_pp",
    "euler_ancestral_cfg_pp",
    "euler_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "res_multistep",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "res_multistep_cfg_pp",
]


def _uncond(model: Denoiser) -> torch.Tensor:
    if model.uncond_denoised is None:
        raise RuntimeError("a cfg++ sampler needs the uncond prediction (registry needs_uncond)")
    return model.uncond_denoised


def euler_ancestral_cfg_pp(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, eta: float = 1.0, s_noise: float = 1.0
) -> SamplerProcess:
    """Euler ancestral with CFG++: the step direction comes from the unguided prediction."""
    noise = env.gaussian_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        # α = σ·e^λ: 1 for eps/v, 1 − σ for CONST (λ from the model sampling, no first-sigma offset)
        alpha_s = sigmas[i] * model_half_log_snr(env.model_sampling, sigmas[i]).exp()
        alpha_t = sigmas[i + 1] * model_half_log_snr(env.model_sampling, sigmas[i + 1]).exp()
        d = to_d(x, sigmas[i], alpha_s * _uncond(model))
        sigma_down, sigma_up = ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta=eta)
        x = alpha_t * denoised + (alpha_t * sigma_down) * d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def euler_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """Euler with CFG++ (the ancestral variant with eta 0)."""
    return (yield from euler_ancestral_cfg_pp(model, x, sigmas, env, eta=0.0, s_noise=0.0))


def dpmpp_2s_ancestral_cfg_pp(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv
) -> SamplerProcess:
    """DPM-Solver++(2S) ancestral with CFG++: unguided steps plus the guidance vector."""
    noise = env.gaussian_noise(x)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        uncond = _uncond(model)
        guidance = denoised - uncond
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], uncond) * (sigma_down - sigmas[i])
        else:
            t, t_next = half_log_snr(sigmas[i]), half_log_snr(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_from_half_log_snr(s) / sigma_from_half_log_snr(t)) * x - (-h * 0.5).expm1() * uncond
            yield from model(x_2, sigma_from_half_log_snr(s))
            x = (sigma_from_half_log_snr(t_next) / sigma_from_half_log_snr(t)) * x - (-h).expm1() * _uncond(model)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
        x = x + guidance
    return x


def dpmpp_2m_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """DPM-Solver++(2M) with CFG++."""
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        uncond = _uncond(model)
        t, t_next = half_log_snr(sigmas[i]), half_log_snr(sigmas[i + 1])
        h = t_next - t
        if old_uncond is None or sigmas[i + 1] == 0:
            mix = -torch.exp(-h) * uncond
        else:
            r = (t - half_log_snr(sigmas[i - 1])) / h
            mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
    return x


def _res_multistep(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, eta: float, cfg_pp: bool
) -> SamplerProcess:
    """RES 2nd-order multistep (arXiv 2308.02157), optionally ancestral and/or CFG++."""
    noise = env.gaussian_noise(x)

    def phi1(t: torch.Tensor) -> torch.Tensor:
        return torch.expm1(t) / t

    def phi2(t: torch.Tensor) -> torch.Tensor:
        return (phi1(t) - 1.0) / t

    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        uncond = _uncond(model) if cfg_pp else None
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + to_d(x, sigmas[i], uncond) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old = half_log_snr(sigmas[i]), half_log_snr(old_sigma_down)
            t_next, t_prev = half_log_snr(sigma_down), half_log_snr(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1(-h), phi2(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
                x = sigma_from_half_log_snr(h) * x + h * (b1 * uncond + b2 * old_denoised)
            else:
                x = sigma_from_half_log_snr(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * 1.0 * sigma_up
        old_denoised = uncond if cfg_pp else denoised
        old_sigma_down = sigma_down
    return x


def res_multistep(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    return (yield from _res_multistep(model, x, sigmas, env, eta=0.0, cfg_pp=False))


def res_multistep_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    return (yield from _res_multistep(model, x, sigmas, env, eta=0.0, cfg_pp=True))


def res_multistep_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    return (yield from _res_multistep(model, x, sigmas, env, eta=1.0, cfg_pp=False))


def res_multistep_ancestral_cfg_pp(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv
) -> SamplerProcess:
    return (yield from _res_multistep(model, x, sigmas, env, eta=1.0, cfg_pp=True))


def _gradient_estimation(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, cfg_pp: bool, ge_gamma: float = 2.0
) -> SamplerProcess:
    """Gradient-estimation sampler (Permenter & Yuan): Euler plus (γ − 1)·(d − d_prev)·dt."""
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        d = to_d(x, sigmas[i], _uncond(model) if cfg_pp else denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def gradient_estimation(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    return (yield from _gradient_estimation(model, x, sigmas, env, cfg_pp=False))


def gradient_estimation_cfg_pp(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv
) -> SamplerProcess:
    return (yield from _gradient_estimation(model, x, sigmas, env, cfg_pp=True))
