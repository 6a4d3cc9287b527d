"""UniPC (Zhao et al. 2023, arXiv 2302.04867) as ComfyUI runs it: multistep, data prediction, order 3.

ComfyUI's ``uni_pc`` (B(h) = h, "bh1") and ``uni_pc_bh2`` (B(h) = e^h − 1) work in the VP view
of an eps model whatever the model's prediction (ComfyUI has no CONST branch here): x is divided
by √(1 + σ₀²) at the start, the schedule's final 0 becomes σ = 0.001, time is σ itself, the
order is min(3, steps − 1) with lower orders at both ends, the corrector runs after every step
but the last, and each evaluation is at the predicted (not the corrected) point.
"""

from __future__ import annotations

from functools import partial

import torch

from deployments.sampling.base import Denoiser, SamplerEnv, SamplerProcess

__all__ = ["uni_pc", "uni_pc_bh2"]


def _log_alpha(sigma: torch.Tensor) -> torch.Tensor:
    """log α of the VP process with α² = 1 / (1 + σ²)."""
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _alpha(sigma: torch.Tensor) -> torch.Tensor:
    return torch.exp(_log_alpha(sigma))


def _std(sigma: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _log_alpha(sigma)))


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    log_mean = _log_alpha(sigma)
    return log_mean - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean))


class _UniPC:
    def __init__(self, model: Denoiser, variant: str) -> None:
        self.model = model
        self.variant = variant

    def data_prediction(self, x: torch.Tensor, sigma: torch.Tensor) -> SamplerProcess:
        """x0 from the VP-view x: the model sees x·√(1 + σ²), its eps is converted back."""
        scaled = x * ((sigma**2 + 1.0) ** 0.5)
        denoised = yield from self.model(scaled, sigma)
        eps = (scaled - denoised) / sigma
        return (x - _std(sigma) * eps) / _alpha(sigma)

    def update(
        self,
        x: torch.Tensor,
        model_history: list[torch.Tensor],
        t_history: list[torch.Tensor],
        t: torch.Tensor,
        order: int,
        use_corrector: bool,
    ) -> SamplerProcess:
        """One predictor (+ corrector) step of order ``order``; returns (x_t, model_t or None)."""
        t_prev_0 = t_history[-1]
        lambda_prev_0, lambda_t = _lambda(t_prev_0), _lambda(t)
        model_prev_0 = model_history[-1]
        sigma_prev_0, sigma_t = _std(t_prev_0), _std(t)
        alpha_t = torch.exp(_log_alpha(t))
        h = lambda_t - lambda_prev_0

        rks: list[torch.Tensor | float] = []
        d1s: list[torch.Tensor] = []
        for i in range(1, order):
            rk = (_lambda(t_history[-(i + 1)]) - lambda_prev_0) / h
            rks.append(rk)
            d1s.append((model_history[-(i + 1)] - model_prev_0) / rk)
        rks.append(1.0)
        rks_t = torch.tensor(rks, device=x.device)

        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        b_h = hh if self.variant == "bh1" else torch.expm1(hh)
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append(torch.pow(rks_t, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r_matrix = torch.stack(rows)
        b_t = torch.tensor(b, device=x.device)

        stacked = torch.stack(d1s, dim=1) if d1s else None
        if stacked is not None:
            rhos_p = (
                torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(r_matrix[:-1, :-1], b_t[:-1])
            )
        if use_corrector:
            rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r_matrix, b_t)

        x_t_ = sigma_t / sigma_prev_0 * x - alpha_t * h_phi_1 * model_prev_0
        pred_res = torch.tensordot(stacked, rhos_p, dims=([1], [0])) if stacked is not None else 0
        x_t = x_t_ - alpha_t * b_h * pred_res
        model_t = None
        if use_corrector:
            model_t = yield from self.data_prediction(x_t, t)
            corr_res = torch.tensordot(stacked, rhos_c[:-1], dims=([1], [0])) if stacked is not None else 0
            x_t = x_t_ - alpha_t * b_h * (corr_res + rhos_c[-1] * (model_t - model_prev_0))
        return x_t, model_t


def uni_pc(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, env: SamplerEnv, variant: str = "bh1"
) -> SamplerProcess:
    """UniPC-3 multistep with lower orders at the ends; the result is brought back to the VE view.

    A final sigma 0 is replaced by 0.001 IN the run's sigmas, as ComfyUI writes it through a view:
    the end of the run (a CONST model's inverse noise scaling divides by 1 − 0.001) and the
    differential-diffusion mask (its last sigma) see 0.001 too.
    """
    if sigmas[-1] == 0:
        sigmas[-1] = 0.001
    timesteps = sigmas
    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    steps = len(timesteps) - 1
    order = min(3, len(timesteps) - 2)
    solver = _UniPC(model, variant)
    model_history: list[torch.Tensor] = []
    t_history: list[torch.Tensor] = []
    for step_index in range(steps):
        if step_index == 0:
            t = timesteps[0]
            model_history = [(yield from solver.data_prediction(x, t))]
            t_history = [t]
        elif step_index < order:
            t = timesteps[step_index]
            x, model_x = yield from solver.update(x, model_history, t_history, t, step_index, use_corrector=True)
            if model_x is None:
                model_x = yield from solver.data_prediction(x, timesteps[step_index])
            model_history.append(model_x)
            t_history.append(t)
        else:
            last = 1 if step_index == steps - 1 else 0
            for step in range(step_index, step_index + 1 + last):
                t = timesteps[step]
                step_order = min(order, steps + 1 - step)
                use_corrector = step != steps
                x, model_x = yield from solver.update(x, model_history, t_history, t, step_order, use_corrector)
                for i in range(order - 1):
                    t_history[i] = t_history[i + 1]
                    model_history[i] = model_history[i + 1]
                t_history[-1] = t
                if step < steps:
                    if model_x is None:
                        model_x = yield from solver.data_prediction(x, timesteps[step])
                    model_history[-1] = model_x
        env.report(model_history[-1])  # ComfyUI's callback after each step: the newest x0 it keeps
    return x / _alpha(timesteps[-1])


uni_pc_bh2 = partial(uni_pc, variant="bh2")
