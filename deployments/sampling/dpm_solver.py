"""DPM-Solver (Lu et al. 2022, arXiv 2206.00927): fixed-step "fast" and adaptive, as generators.

As in ComfyUI these ignore the schedule's inner sigmas: they integrate from sigmas[0] down to the
last non-zero sigma in t = −log σ, with their own step sizes; ``dpm_adaptive`` chooses the number
of model evaluations itself (a PID step-size controller), which a generator handles naturally.
"""

from __future__ import annotations

import math

import torch

from deployments.sampling.base import Denoiser, SamplerEnv, SamplerProcess

__all__ = ["dpm_adaptive", "dpm_fast"]


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _t(sigma: torch.Tensor) -> torch.Tensor:
    return -sigma.log()


class _Solver:
    """The DPM-Solver 1/2/3 steps over an eps cache; every model call goes through ``eps``."""

    def __init__(self, model: Denoiser) -> None:
        self.model = model

    def eps(self, cache: dict[str, torch.Tensor], key: str, x: torch.Tensor, t: torch.Tensor) -> SamplerProcess:
        if key not in cache:
            denoised = yield from self.model(x, _sigma(t))
            cache[key] = (x - denoised) / _sigma(t)
        return cache[key]

    def step_1(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: dict) -> SamplerProcess:
        h = t_next - t
        eps = yield from self.eps(cache, "eps", x, t)
        return x - _sigma(t_next) * h.expm1() * eps

    def step_2(
        self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: dict, r1: float = 1 / 2
    ) -> SamplerProcess:
        h = t_next - t
        eps = yield from self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = yield from self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(
        self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: dict, r1: float = 1 / 3, r2: float = 2 / 3
    ) -> SamplerProcess:
        h = t_next - t
        eps = yield from self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = yield from self.eps(cache, "eps_r1", u1, s1)
        u2 = (
            x
            - _sigma(s2) * (r2 * h).expm1() * eps
            - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        )
        eps_r2 = yield from self.eps(cache, "eps_r2", u2, s2)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)


def _range(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's wrapper: from sigmas[0] to the last sigma, or the one before if it is 0."""
    sigma_min = sigmas[-1]
    if sigma_min == 0:
        sigma_min = sigmas[-2]
    if sigma_min <= 0 or sigmas[0] <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    return sigma_min, sigmas[0]


def dpm_fast(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """DPM-Solver-Fast: len(sigmas) − 1 evaluations spread as 3rd-order steps (+ a 2nd/1st-order tail)."""
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = _range(sigmas)
    nfe = len(sigmas) - 1
    noise = env.gaussian_noise(x)
    solver = _Solver(model)
    t_start, t_end = _t(sigma_max.clone()), _t(sigma_min.clone())
    m = math.floor(nfe / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        cache: dict[str, torch.Tensor] = {}
        t, t_next = ts[i], ts[i + 1]
        eps = yield from solver.eps(cache, "eps", x, t)
        env.report(x - _sigma(t) * eps)  # k-diffusion's info_callback: x0 recomputed from eps
        if order == 1:
            x = yield from solver.step_1(x, t, t_next, cache)
        elif order == 2:
            x = yield from solver.step_2(x, t, t_next, cache)
        else:
            x = yield from solver.step_3(x, t, t_next, cache)
        x = x + 0.0 * 1.0 * noise(_sigma(t), _sigma(t_next))  # eta 0: drawn and unused, as ComfyUI
    return x


def _limiter(value: float) -> float:
    return 1 + math.atan(value - 1)


def dpm_adaptive(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    env: SamplerEnv,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    accept_safety: float = 0.81,
) -> SamplerProcess:
    """DPM-Solver-23 with an integral step-size controller (ComfyUI defaults: order 3, I-controller)."""
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = _range(sigmas)
    noise = env.gaussian_noise(x)
    solver = _Solver(model)
    t_start, t_end = _t(sigma_max.clone()), _t(sigma_min.clone())
    forward = bool(t_end > t_start)
    step = abs(h_init) * (1 if forward else -1)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    # PID coefficients for pcoeff 0, icoeff 1, dcoeff 0 (k-diffusion's defaults)
    b1, b2, b3 = 1.0 / order, 0.0, 0.0
    errors: list[float] = []
    s = t_start
    x_prev = x
    while (s < t_end - 1e-5) if forward else (s > t_end + 1e-5):
        cache: dict[str, torch.Tensor] = {}
        t = torch.minimum(t_end, s + step) if forward else torch.maximum(t_end, s + step)
        eps = yield from solver.eps(cache, "eps", x, s)
        denoised = x - _sigma(s) * eps
        if order == 2:
            x_low = yield from solver.step_1(x, s, t, cache)
            x_high = yield from solver.step_2(x, s, t, cache)
        else:
            x_low = yield from solver.step_2(x, s, t, cache, r1=1 / 3)
            x_high = yield from solver.step_3(x, s, t, cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        inverse = 1 / (env.read(error) + 1e-8)  # a host read of a device value
        if not errors:
            errors = [inverse, inverse, inverse]
        errors[0] = inverse
        factor = _limiter(errors[0] ** b1 * errors[1] ** b2 * errors[2] ** b3)
        accept = factor >= accept_safety
        if accept:
            errors[2], errors[1] = errors[1], errors[0]
        step *= factor
        if accept:
            x_prev = x_low
            x = x_high + 0.0 * 1.0 * noise(_sigma(s), _sigma(t))
            s = t
        env.report(denoised)  # after every attempt, accepted or not, as k-diffusion's info_callback
    return x
