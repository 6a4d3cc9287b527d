"""Multistep and exponential-integrator samplers: iPNDM, DEIS, ER-SDE, SEEDS, exp-Heun, SA-Solver.

Algorithms from the cited papers as ComfyUI runs them (diff-sampler's iPNDM/DEIS, the ER-SDE and
SEEDS reference code, SA-Solver), written here as generators.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deployments.sampling.base import (
    Denoiser,
    SamplerEnv,
    SamplerProcess,
    model_half_log_snr,
    model_sigma_from_half_log_snr,
    offset_first_sigma,
)

__all__ = [
    "deis",
    "er_sde",
    "exp_heun_2_x0",
    "exp_heun_2_x0_sde",
    "ipndm",
    "ipndm_v",
    "sa_solver",
    "sa_solver_pece",
    "seeds_2",
    "seeds_3",
]


def _push(history: list[torch.Tensor], value: torch.Tensor, size: int) -> None:
    """Keep the last ``size`` derivatives, oldest first."""
    history.append(value)
    if len(history) > size:
        history.pop(0)


def ipndm(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, max_order: int = 4
) -> SamplerProcess:
    """Improved PNDM: Adams–Bashforth on dx/dσ with fixed coefficients, order up to 4."""
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = yield from model(x, t_cur)
        env.report(denoised)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x + (t_next - t_cur) * (3 * d_cur - history[-1]) / 2
        elif order == 3:
            x_next = x + (t_next - t_cur) * (23 * d_cur - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            combo = 55 * d_cur - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]
            x_next = x + (t_next - t_cur) * combo / 24
        _push(history, d_cur, max_order - 1)
        x = x_next
    return x


def ipndm_v(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, max_order: int = 4
) -> SamplerProcess:
    """iPNDM with variable step sizes: Adams–Bashforth coefficients from the actual σ gaps."""
    t = sigmas
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = yield from model(x, t_cur)
        env.report(denoised)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        else:
            h_n = t_next - t_cur
            h_n_1 = t_cur - t[i - 1]
            if order == 2:
                coeff1 = (2 + (h_n / h_n_1)) / 2
                coeff2 = -(h_n / h_n_1) / 2
                x_next = x + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * history[-1])
            elif order == 3:
                h_n_2 = t[i - 1] - t[i - 2]
                temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
                coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
                coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
                coeff3 = temp * h_n_1 / h_n_2
                x_next = x + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * history[-1] + coeff3 * history[-2])
            else:
                h_n_2 = t[i - 1] - t[i - 2]
                h_n_3 = t[i - 2] - t[i - 3]
                temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
                temp2 = (
                    (
                        (1 - h_n / (3 * (h_n + h_n_1))) / 2
                        + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))
                    )
                    * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2))
                    / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
                )
                ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
                coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
                coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + ratio) * temp2
                coeff3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio * (1 + h_n_2 / h_n_3)) * temp2
                coeff4 = -temp2 * ratio * h_n_1 / h_n_2
                x_next = x + (t_next - t_cur) * (
                    coeff1 * d_cur + coeff2 * history[-1] + coeff3 * history[-2] + coeff4 * history[-3]
                )
        _push(history, d_cur, max_order - 1)
        x = x_next
    return x


# ---------------------------------------------------------------------- DEIS


def _deis_times(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map EDM sigmas to the VP time t of a linear-beta schedule fitted to σ ∈ [0.002, 80] (DEIS' choice)."""
    epsilon_s, sigma_min, sigma_max = 1e-3, torch.tensor(0.002), torch.tensor(80)
    log_min = torch.from_numpy(np.asarray(np.log((sigma_min**2 + 1).numpy())))
    log_max = torch.from_numpy(np.asarray(np.log((sigma_max**2 + 1).numpy())))
    beta_d = 2 * (log_min / epsilon_s - log_max) / (epsilon_s - 1)
    beta_min = log_max - 0.5 * beta_d
    sigmas = sigmas.detach().cpu()
    t = ((beta_min**2 + 2 * beta_d * (sigmas**2 + 1).log()).sqrt() - beta_min) / beta_d
    return t, beta_min, beta_d + beta_min


def _deis_integrand(beta_0: torch.Tensor, beta_1: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """−½ · d log α/dτ / √(α(1 − α)), the derivative taken by autograd as ComfyUI does (bit-equal sums)."""
    with torch.inference_mode(False), torch.enable_grad():
        taus = taus.clone().requires_grad_(True)
        alpha = torch.exp(-0.5 * taus**2 * (beta_1.clone() - beta_0.clone()) - taus * beta_0.clone())
        alpha.log().sum().backward()
        slope = taus.grad
    return -0.5 * slope / torch.sqrt(alpha.detach() * (1 - alpha.detach()))


def deis_coefficients(sigmas: torch.Tensor, max_order: int, points: int = 10000) -> list[list[torch.Tensor]]:
    """DEIS 'tab' coefficients: ∫ of each Lagrange basis times the VP integrand, by a Riemann sum."""
    t_steps, beta_0, beta_1 = _deis_times(sigmas)
    coefficients: list[list[torch.Tensor]] = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        order = min(i + 1, max_order)
        if order == 1:
            coefficients.append([])
            continue
        taus = torch.linspace(t_cur, t_next, points)
        dtau = (t_next - t_cur) / points
        previous = t_steps[[i - k for k in range(order)]]
        integrand = _deis_integrand(beta_0, beta_1, taus)
        row = []
        for j in range(order):
            basis = 1
            for k in range(previous.shape[0]):
                if k != j:
                    basis = basis * ((taus - previous[k]) / (previous[j] - previous[k]))
            row.append(torch.sum(integrand * basis) * dtau)
        coefficients.append(row)
    return coefficients


def deis(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, max_order: int = 3) -> SamplerProcess:
    """DEIS (Zhang & Chen 2022), 'tab' mode, order up to 3 as ComfyUI."""
    coefficients = deis_coefficients(sigmas, max_order)
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = yield from model(x, t_cur)
        env.report(denoised)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next <= 0:
            order = 1
        if order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        else:
            row = [c.to(x.device) for c in coefficients[i]]
            x_next = x + row[0] * d_cur
            for k in range(1, order):
                x_next = x_next + row[k] * history[-k]
        _push(history, d_cur, max_order - 1)
        x = x_next
    return x


# ---------------------------------------------------------------------- ER-SDE


def _er_sde_noise_scaler(x: torch.Tensor) -> torch.Tensor:
    return x * ((x**0.3).exp() + 10.0)


def er_sde(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, s_noise: float = 1.0, max_stage: int = 3
) -> SamplerProcess:
    """Extended reverse-time SDE solver, VP ER-SDE-Solver-3 (arXiv 2309.06169)."""
    noise = env.gaussian_noise(x)
    points = 200.0
    index = torch.arange(0, points, dtype=torch.float32, device=x.device)
    sigmas = offset_first_sigma(env.model_sampling, sigmas)
    er_lambdas = model_half_log_snr(env.model_sampling, sigmas).neg().exp()  # sigma / alpha
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r_alpha = alpha_t / alpha_s
            r = _er_sde_noise_scaler(lam_t) / _er_sde_noise_scaler(lam_s)
            x = r_alpha * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = lam_t - lam_s
                positions = lam_t + index * (-dt / points)
                scaled = _er_sde_noise_scaler(positions)
                step = -dt / points
                s = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (lam_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * _er_sde_noise_scaler(lam_t)) * denoised_d
                if stage >= 3:
                    s_u = torch.sum((positions - lam_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt**2) / 2 + s_u * _er_sde_noise_scaler(lam_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                spread = (lam_t**2 - lam_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise(sigmas[i], sigmas[i + 1]) * s_noise * spread
        old_denoised = denoised
    return x


# ---------------------------------------------------------------------- SEEDS / exp-Heun


def _phi_1(h: torch.Tensor) -> torch.Tensor:
    """h·φ₁(h) = e^h − 1."""
    return torch.expm1(h)


def _phi_2(h: torch.Tensor) -> torch.Tensor:
    """h·φ₂(h) = (e^h − 1 − h) / h."""
    return (torch.expm1(h) - h) / h


def _seeds_2(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    env: SamplerEnv,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    solver_type: str = "phi_1",
) -> SamplerProcess:
    """SEEDS-2 (arXiv 2305.14267), data prediction, 2 stages; r = 1 with phi_2 is exp-Heun."""
    noise = env.gaussian_noise(x)
    inject = eta > 0 and s_noise > 0
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
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = model_sigma_from_half_log_snr(ms, lambda_s_1)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        x_2 = sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * _phi_1(-r * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = yield from model(x_2, sigma_s_1)
        decay = sigmas[i + 1] / sigmas[i] * (-h * eta).exp()
        if solver_type == "phi_1":
            x = decay * x - alpha_t * _phi_1(-h_eta) * torch.lerp(denoised, denoised_2, fac)
        else:
            b2 = _phi_2(-h_eta) / r
            b1 = _phi_1(-h_eta) - b2
            x = decay * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject:
            segment = (r - 1) * h * eta
            sde_noise = sde_noise * segment.exp()
            sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise(sigma_s_1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def seeds_2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    return (yield from _seeds_2(model, x, sigmas, env))


def exp_heun_2_x0(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """Deterministic exponential Heun, 2nd order, in x0 prediction and log-SNR time."""
    return (yield from _seeds_2(model, x, sigmas, env, eta=0.0, s_noise=0.0, r=1.0, solver_type="phi_2"))


def exp_heun_2_x0_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    """Stochastic exponential Heun (eta 1)."""
    return (yield from _seeds_2(model, x, sigmas, env, eta=1.0, s_noise=1.0, r=1.0, solver_type="phi_2"))


def seeds_3(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    env: SamplerEnv,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r_1: float = 1.0 / 3,
    r_2: float = 2.0 / 3,
) -> SamplerProcess:
    """SEEDS-3: three stages at r₁ and r₂ of the log-SNR step."""
    noise = env.gaussian_noise(x)
    inject = eta > 0 and s_noise > 0
    ms = env.model_sampling
    sigmas = offset_first_sigma(ms, sigmas)
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x, sigmas[i])
        env.report(denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = model_half_log_snr(ms, sigmas[i]), model_half_log_snr(ms, sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1, lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_1), torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1 = model_sigma_from_half_log_snr(ms, lambda_s_1)
        sigma_s_2 = model_sigma_from_half_log_snr(ms, lambda_s_2)
        alpha_s_1, alpha_s_2 = sigma_s_1 * lambda_s_1.exp(), sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        x_2 = sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s_1 * _phi_1(-r_1 * h_eta) * denoised
        if inject:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = yield from model(x_2, sigma_s_1)
        a3_2 = r_2 / r_1 * _phi_2(-r_2 * h_eta)
        a3_1 = _phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            segment = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment.exp()
            sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise(sigma_s_1, sigma_s_2)
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = yield from model(x_3, sigma_s_2)
        b3 = _phi_2(-h_eta) / r_2
        b1 = _phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            segment = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment.exp()
            sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise(sigma_s_2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


# ---------------------------------------------------------------------- SA-Solver


def _exponential_coefficients(s: torch.Tensor, t: torch.Tensor, order: int, tau: float) -> torch.Tensor:
    """(1 + τ²)·∫_s^t e^{(1+τ²)(x−t)} x^p dx for p < order, by repeated integration by parts."""
    tau_mul = 1 + tau**2
    h = t - s
    p = torch.arange(order, dtype=s.dtype, device=s.device)
    boundary = t**p - s**p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    log_coeff = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau > 0:
        log_coeff = log_coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    return (log_coeff.exp() * signs).tril() @ boundary


def _adams_coefficients(
    sigma_next: torch.Tensor, lambdas: torch.Tensor, lambda_s: torch.Tensor, lambda_t: torch.Tensor, tau: float
) -> torch.Tensor:
    """SA-Solver's b_i (eqs. 15/18): Lagrange-basis integrals over [λ_s, λ_t], times α_t."""
    count = lambdas.shape[0]
    integrals = torch.linalg.solve(
        torch.vander(lambdas, count, increasing=True).T, _exponential_coefficients(lambda_s, lambda_t, count, tau)
    )
    return sigma_next * lambda_t.exp() * integrals


def _sa_solver(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    env: SamplerEnv,
    use_pece: bool,
    predictor_order: int = 3,
    corrector_order: int = 4,
    s_noise: float = 1.0,
) -> SamplerProcess:
    """Stochastic Adams predictor–corrector (arXiv 2309.05019), τ = 1 between 20 % and 80 % of the run."""
    if len(sigmas) <= 1:
        return x
    noise_sampler = env.gaussian_noise(x)
    sigmas = offset_first_sigma(env.model_sampling, sigmas)
    lambdas = model_half_log_snr(env.model_sampling, sigmas)
    start_sigma = env.model_sampling.percent_to_sigma(0.2)
    end_sigma = env.model_sampling.percent_to_sigma(0.8)

    def tau_of(sigma: torch.Tensor) -> float:
        return 1.0 if start_sigma >= float(sigma) >= end_sigma else 0.0

    max_order = max(predictor_order, corrector_order)
    x_pred = x
    h: torch.Tensor | float = 0.0
    tau = 0.0
    noise: torch.Tensor | float = 0.0
    predictions: list[torch.Tensor] = []
    lower_order_to_end = float(sigmas[-1]) == 0
    for i in range(len(sigmas) - 1):
        denoised = yield from model(x_pred, sigmas[i])
        env.report(denoised)
        predictions.append(denoised)
        predictions = predictions[-max_order:]
        predictor_used = min(predictor_order, len(predictions))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_used = 0
        else:
            corrector_used = min(corrector_order, len(predictions))
        if lower_order_to_end:
            predictor_used = min(predictor_used, len(sigmas) - 2 - i)
            corrector_used = min(corrector_used, len(sigmas) - 1 - i)
        if corrector_used == 0:
            x = x_pred
        else:
            b = _adams_coefficients(sigmas[i], lambdas[i - corrector_used + 1 : i + 1], lambdas[i - 1], lambdas[i], tau)
            stacked = torch.stack(predictions[-corrector_used:], dim=1)
            x = sigmas[i] / sigmas[i - 1] * (-(tau**2) * h).exp() * x + torch.tensordot(stacked, b, dims=([1], [0]))
            if tau > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                denoised = yield from model(x, sigmas[i])  # not reported: ComfyUI's callback ran above
                predictions[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau = tau_of(sigmas[i + 1])
            b = _adams_coefficients(
                sigmas[i + 1], lambdas[i - predictor_used + 1 : i + 1], lambdas[i], lambdas[i + 1], tau
            )
            stacked = torch.stack(predictions[-predictor_used:], dim=1)
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau**2) * h).exp() * x + torch.tensordot(
                stacked, b, dims=([1], [0])
            )
            if tau > 0 and s_noise > 0:
                spread = (-2 * tau**2 * h).expm1().neg().sqrt()
                noise = noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * spread * s_noise
                x_pred = x_pred + noise
    return x_pred


def sa_solver(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    return (yield from _sa_solver(model, x, sigmas, env, use_pece=False))


def sa_solver_pece(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv) -> SamplerProcess:
    return (yield from _sa_solver(model, x, sigmas, env, use_pece=True))
