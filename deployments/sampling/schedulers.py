"""ComfyUI's sigma schedules (``scheduler`` names) and KSampler's denoise arithmetic.

Each schedule returns a float32 tensor of sigmas from high to low, normally ending at 0, computed
with ComfyUI's own formulas and dtypes (quirks included: ``ddim_uniform`` may return more than
``steps`` steps, ``beta`` drops repeated timesteps). :func:`ksampler_sigmas` adds what
``KSampler.set_steps`` does on top: the penultimate-sigma discard of some samplers and the
``denoise`` truncation. :func:`impact_schedule` is Impact Pack's other way of cutting the same
schedule (``ksampler_wrapper`` → ``separated_sample``), which FaceDetailer samples through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import scipy.stats
import torch

from deployments.sampling.model_sampling import ModelSampling

__all__ = [
    "FULL_DENOISE",
    "SCHEDULERS",
    "SLICINGS",
    "Slicing",
    "calculate_sigmas",
    "impact_schedule",
    "impact_total_steps",
    "karras_sigmas",
    "exponential_sigmas",
    "full_schedule",
    "ksampler_sigmas",
    "schedule_length",
]

FULL_DENOISE = 0.9999  # KSampler.set_steps: denoise above this runs the plain schedule
SCHEDULE_MEMO_SIZE = 256  # schedules remembered per model sampling (a few KB each)

# How a denoise < 1 run is cut out of a longer schedule: ComfyUI's KSampler node, or Impact Pack's
# ksampler_wrapper (FaceDetailer, Detailer, ...). See docs/samplers.md "Denoise slicing".
Slicing = Literal["ksampler", "impact"]
SLICINGS: tuple[str, ...] = ("ksampler", "impact")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): sigma^(1/ρ) spaced linearly from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """log-sigma spaced linearly from sigma_max to sigma_min, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The KL-optimal schedule (A1111 PR 15608): linear in arctan(sigma), then 0."""
    position = torch.arange(n, dtype=torch.float).div_(n - 1)
    sigmas = position.new_zeros(n + 1)
    sigmas[:-1] = (position * math.atan(sigma_min) + (1 - position) * math.atan(sigma_max)).tan_()
    return sigmas


def simple_sigmas(model_sampling: ModelSampling, steps: int) -> torch.Tensor:
    """Every (1000/steps)-th table entry from the top, index truncated, then 0."""
    table = model_sampling.sigmas
    stride = len(table) / steps
    return torch.FloatTensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def ddim_uniform_sigmas(model_sampling: ModelSampling, steps: int) -> torch.Tensor:
    """Timesteps 1, 1 + k, 1 + 2k, … (k = 1000 // steps) reversed, then 0: DDIM's "leading" grid."""
    table = model_sampling.sigmas
    index = 1
    if math.isclose(float(table[index]), 0, abs_tol=0.00001):
        steps += 1
        sigmas: list[float] = []
    else:
        sigmas = [0.0]
    stride = max(len(table) // steps, 1)
    while index < len(table):
        sigmas.append(float(table[index]))
        index += stride
    return torch.FloatTensor(sigmas[::-1])


def normal_sigmas(model_sampling: ModelSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    """Timesteps spaced linearly from timestep(sigma_max) to timestep(sigma_min), then 0.

    ``sgm`` (``sgm_uniform``): steps + 1 points with the last dropped, as Stability's sgm code.
    """
    start = model_sampling.timestep(model_sampling.sigma_max)
    end = model_sampling.timestep(model_sampling.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(model_sampling.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigmas = model_sampling.sigma_values(timesteps)  # = [float(model_sampling.sigma(t)) for t in timesteps]
    return torch.FloatTensor(sigmas + ([0.0] if append_zero else []))


def beta_sigmas(model_sampling: ModelSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Beta(0.6, 0.6) quantiles spaced in timesteps (arXiv 2407.12173), repeats dropped, then 0."""
    total = len(model_sampling.sigmas) - 1
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    timesteps = np.rint(scipy.stats.beta.ppf(quantiles, alpha, beta) * total)
    sigmas: list[float] = []
    last = -1.0
    for t in timesteps:
        if t != last:
            sigmas.append(float(model_sampling.sigmas[int(t)]))
        last = t
    return torch.FloatTensor(sigmas + [0.0])


def linear_quadratic_sigmas(
    model_sampling: ModelSampling, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> torch.Tensor:
    """Mochi's schedule: linear in the first half, quadratic after, scaled by sigma_max."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        threshold_step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = threshold_step_diff / (linear_steps * quadratic_steps**2)
        linear_coef = threshold_noise / linear_steps - 2 * threshold_step_diff / (quadratic_steps**2)
        const = quadratic_coef * (linear_steps**2)
        quadratic = [quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - value for value in linear + quadratic + [1.0]]
    return torch.FloatTensor(schedule) * model_sampling.sigma_max


def _from_range(function: Callable[[int, float, float], torch.Tensor]) -> Callable[[ModelSampling, int], torch.Tensor]:
    def schedule(model_sampling: ModelSampling, steps: int) -> torch.Tensor:
        return function(steps, float(model_sampling.sigma_min), float(model_sampling.sigma_max))

    return schedule


# ComfyUI's SCHEDULER_NAMES, in its order.
SCHEDULERS: dict[str, Callable[[ModelSampling, int], torch.Tensor]] = {
    "simple": simple_sigmas,
    "sgm_uniform": lambda model_sampling, steps: normal_sigmas(model_sampling, steps, sgm=True),
    "karras": _from_range(karras_sigmas),
    "exponential": _from_range(exponential_sigmas),
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "normal": normal_sigmas,
    "linear_quadratic": linear_quadratic_sigmas,
    "kl_optimal": _from_range(kl_optimal_sigmas),
}


def calculate_sigmas(model_sampling: ModelSampling, scheduler: str, steps: int) -> torch.Tensor:
    """ComfyUI's ``calculate_sigmas``: the named schedule of ``steps`` steps (remembered per model sampling)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}")
    memo = model_sampling.schedule_memo
    found = memo.get((scheduler, steps))
    if found is None:
        if len(memo) >= SCHEDULE_MEMO_SIZE:
            memo.clear()
        found = memo[(scheduler, steps)] = SCHEDULERS[scheduler](model_sampling, steps)
    return found.clone()  # callers may write into their schedule (Impact's end cut does)


def schedule_length(steps: int, denoise: float) -> int:
    """KSampler's schedule length T: ``steps`` at full denoise, else ``int(steps / denoise)``."""
    return steps if denoise > FULL_DENOISE else int(steps / denoise)


def ksampler_sigmas(
    model_sampling: ModelSampling, scheduler: str, steps: int, denoise: float, discard_penultimate: bool = False
) -> torch.Tensor:
    """``KSampler.set_steps``: the last ``steps + 1`` sigmas of a ``int(steps / denoise)``-step schedule.

    ``discard_penultimate`` (dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2): the schedule is computed
    with one more step and its second-to-last sigma dropped.
    """

    if denoise > FULL_DENOISE:
        return full_schedule(model_sampling, scheduler, steps, discard_penultimate)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return full_schedule(model_sampling, scheduler, int(steps / denoise), discard_penultimate)[-(steps + 1) :]


def full_schedule(
    model_sampling: ModelSampling, scheduler: str, total: int, discard_penultimate: bool = False
) -> torch.Tensor:
    """``KSampler.calculate_sigmas`` (= Impact's ``calculate_sigmas``): ``total`` steps, or
    ``total + 1`` with the second-to-last sigma dropped for the discard samplers."""
    if discard_penultimate:
        sigmas = calculate_sigmas(model_sampling, scheduler, total + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return calculate_sigmas(model_sampling, scheduler, total)


def impact_total_steps(steps: int, denoise: float) -> int:
    """Impact's ``advanced_steps = math.floor(steps / denoise)`` (no full-denoise special case)."""
    return math.floor(steps / denoise)


def impact_schedule(
    model_sampling: ModelSampling, scheduler: str, steps: int, denoise: float, discard_penultimate: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Impact's ``ksampler_wrapper`` → ``separated_sample`` cut: (run sigmas, whole schedule).

    T = floor(steps / denoise) schedule steps, start = T − steps, end = T. When the schedule has
    more than T steps (``ddim_uniform``), it is cut to its first T + 1 sigmas and the last one set
    to 0; then the run starts at index ``start`` (counted from the top, where KSampler counts
    ``steps + 1`` from the bottom). When ``start`` is not before the last sigma (a ``beta`` or
    ``ddim_uniform`` schedule much shorter than T), Impact returns the latent unsampled: the run
    sigmas are then empty. The whole schedule is returned as Impact leaves it (its end-cut writes
    the 0 through a view, so the whole schedule gets it too): Impact's SDE samplers take their
    Brownian-tree range from it.
    """
    total_steps = impact_total_steps(steps, denoise)
    whole = full_schedule(model_sampling, scheduler, total_steps, discard_penultimate).clone()
    start, end = total_steps - steps, total_steps
    sigmas = whole
    if end < len(whole) - 1:
        sigmas = whole[: end + 1]
        sigmas[-1] = 0.0  # a view: ``whole`` changes too, as in Impact
    if start >= len(sigmas) - 1:
        return whole.new_zeros([0]), whole
    return sigmas[start:].clone(), whole


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])
