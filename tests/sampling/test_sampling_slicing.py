"""Denoise slicing: ComfyUI's KSampler node vs Impact Pack's ksampler_wrapper (FaceDetailer's path).

Expected vectors are built from the published formulas: the SD 1.x DDPM table
σ_t = √((1 − ᾱ_t) / ᾱ_t) in float64, ComfyUI's ``ddim_uniform`` grid (timesteps 1, 1 + k, … with
k = 1000 // T, reversed, then 0), ``KSampler.set_steps`` (the last steps + 1 sigmas of an
int(steps/denoise)-step schedule, the plain schedule above denoise 0.9999) and Impact's
``separated_sample`` (T = floor(steps/denoise), the schedule cut to T + 1 sigmas with the last
set to 0 when it is longer, then the run from index T − steps).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from sampling_helpers import sd15

import deployments.sampling.base as sampling_base
from deployments.sampling import SCHEDULER_NAMES, sample, sigmas_for
from deployments.sampling.schedulers import calculate_sigmas, impact_schedule, impact_total_steps


def sd15_table() -> np.ndarray:
    """The SD 1.x sigma table from the DDPM betas, float64 (independent of ModelSampling)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def at(*timesteps: int) -> np.ndarray:
    """Table sigmas at these timesteps, then a 0 (every run ends at sigma 0)."""
    return np.array([sd15_table()[t] for t in timesteps] + [0.0])


def ddim_uniform_timesteps(total: int) -> list[int]:
    stride = 1000 // total
    return list(range(1, 1000, stride))[::-1]


def assert_sigmas(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape, (actual, expected)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-6, atol=0)


# ------------------------------------------------------------------ where the two modes differ


def test_ddim_uniform_with_a_longer_schedule_is_cut_from_the_top():
    """steps 4, denoise 0.6: T = floor(6.67) = 6, k = 166, 7 timesteps (T + 1 steps)."""
    ms = sd15()
    assert ddim_uniform_timesteps(6) == [997, 831, 665, 499, 333, 167, 1]
    # KSampler: the last 5 sigmas of the 8
    assert_sigmas(sigmas_for(ms, "euler", "ddim_uniform", 4, 0.6), at(499, 333, 167, 1))
    # Impact: the first 7, the last set to 0, then from index T − steps = 2
    assert_sigmas(sigmas_for(ms, "euler", "ddim_uniform", 4, 0.6, slicing="impact"), at(665, 499, 333, 167))


def test_ddim_uniform_at_full_denoise():
    """denoise 1: KSampler runs the whole 8-step grid of steps = 7; Impact cuts it to 7 steps."""
    ms = sd15()
    assert ddim_uniform_timesteps(7) == [995, 853, 711, 569, 427, 285, 143, 1]
    assert_sigmas(sigmas_for(ms, "euler", "ddim_uniform", 7, 1.0), at(995, 853, 711, 569, 427, 285, 143, 1))
    assert_sigmas(
        sigmas_for(ms, "euler", "ddim_uniform", 7, 1.0, slicing="impact"), at(995, 853, 711, 569, 427, 285, 143)
    )


def test_penultimate_discard_then_impact_cut():
    """dpm_2, steps 4, denoise 0.6: the grid of T + 1 = 7 (k = 142), its sigma at t = 1 dropped."""
    ms = sd15()
    assert_sigmas(sigmas_for(ms, "dpm_2", "ddim_uniform", 4, 0.6), at(569, 427, 285, 143))
    assert_sigmas(sigmas_for(ms, "dpm_2", "ddim_uniform", 4, 0.6, slicing="impact"), at(711, 569, 427, 285))
    assert_sigmas(sigmas_for(ms, "uni_pc", "ddim_uniform", 4, 0.6, slicing="impact"), at(711, 569, 427, 285))


def beta_schedule_timesteps(total: int) -> list[int]:
    """ComfyUI's beta scheduler (arXiv 2407.12173): Beta(0.6, 0.6) quantiles × 999, rounded, repeats dropped."""
    quantiles = 1 - np.linspace(0, 1, total, endpoint=False)
    timesteps = np.rint(scipy.stats.beta.ppf(quantiles, 0.6, 0.6) * 999).astype(int)
    kept = [int(timesteps[0])]
    for previous, t in zip(timesteps[:-1], timesteps[1:], strict=True):
        if t != previous:
            kept.append(int(t))
    return kept


def test_beta_with_repeated_timesteps_loses_a_step_in_impact():
    """steps 14, denoise 0.1: T = 140, whose beta grid drops one repeated timestep (140 sigmas)."""
    ms = sd15()
    grid = beta_schedule_timesteps(140)
    assert len(grid) == 139 and impact_total_steps(14, 0.1) == 140
    ksampler = sigmas_for(ms, "euler", "beta", 14, 0.1)
    impact = sigmas_for(ms, "euler", "beta", 14, 0.1, slicing="impact")
    assert_sigmas(ksampler, at(*grid[-14:]))  # the last steps + 1 = 15 sigmas: 14 steps
    assert_sigmas(impact, at(*grid[126:]))  # from index T − steps = 126: 13 steps
    assert torch.equal(impact, ksampler[1:])


def test_impact_returns_the_latent_unsampled_when_the_start_is_past_the_schedule():
    """steps 20, denoise 0.01: T = 2000, but beta gives at most 1000 distinct timesteps."""
    ms = sd15()
    assert len(calculate_sigmas(ms, "beta", 2000)) <= 1001
    assert sigmas_for(ms, "euler", "beta", 20, 0.01, slicing="impact").numel() == 0
    assert len(sigmas_for(ms, "euler", "beta", 20, 0.01)) == 21
    calls: list[float] = []
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, need_uncond: bool) -> tuple[torch.Tensor, None]:
        calls.append(float(sigma))
        return x * 0.5, None

    out = sample(denoiser, ms, scheduler="beta", steps=20, denoise=0.01, latent_image=latent, slicing="impact")
    assert calls == [] and torch.equal(out, latent)
    moved = sample(denoiser, ms, scheduler="beta", steps=20, denoise=0.01, latent_image=latent)
    assert len(calls) == 20 and not torch.allclose(moved, latent)


def test_ddim_uniform_past_1000_steps_is_shorter_than_t():
    """steps 20, denoise 0.02: T = 1000, k = 1: 999 timesteps (1000 sigmas, not 1001)."""
    ms = sd15()
    assert impact_total_steps(20, 0.02) == 1000
    assert_sigmas(sigmas_for(ms, "euler", "ddim_uniform", 20, 0.02), at(*range(20, 0, -1)))
    assert_sigmas(sigmas_for(ms, "euler", "ddim_uniform", 20, 0.02, slicing="impact"), at(*range(19, 0, -1)))


def test_the_run_uses_the_impact_sigmas():
    """The denoiser is called at exactly Impact's sigmas, from latent + noise·σ₀."""
    ms = sd15()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    seen: list[tuple[float, torch.Tensor]] = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, need_uncond: bool) -> tuple[torch.Tensor, None]:
        seen.append((float(sigma), x.clone()))
        return x * 0.5, None

    sample(denoiser, ms, scheduler="ddim_uniform", steps=4, denoise=0.6, latent_image=latent, noise=noise,
           slicing="impact")  # fmt: skip
    expected = at(665, 499, 333, 167)[:-1]
    np.testing.assert_allclose([sigma for sigma, _ in seen], expected, rtol=1e-6)
    torch.testing.assert_close(seen[0][1], latent + noise * float(expected[0]))


# ------------------------------------------------------------------ where they agree


@pytest.mark.parametrize("scheduler", [name for name in SCHEDULER_NAMES if name not in ("ddim_uniform", "beta")])
def test_schedules_of_t_plus_one_sigmas_slice_identically(scheduler: str):
    ms = sd15()
    for steps, denoise in [(1, 1.0), (4, 0.5), (6, 0.3), (7, 0.07), (20, 0.45), (20, 1.0), (3, 0.9999)]:
        for sampler in ("euler", "dpm_2"):
            if scheduler == "kl_optimal" and math.floor(steps / denoise) < 2 and sampler == "euler":
                continue
            ksampler = sigmas_for(ms, sampler, scheduler, steps, denoise)
            impact = sigmas_for(ms, sampler, scheduler, steps, denoise, slicing="impact")
            assert torch.equal(ksampler, impact), (scheduler, sampler, steps, denoise)
            assert len(impact) == steps + 1 and float(impact[-1]) == 0.0


def test_ddim_uniform_of_exactly_t_plus_one_sigmas_agrees_even_when_1000_mod_t_is_not_0():
    """T = 3 (k = 333: t = 667, 334, 1) and T = 9 (k = 111) give T + 1 sigmas: no difference."""
    ms = sd15()
    for steps, denoise, total in [(3, 1.0, 3), (1, 0.3, 3), (3, 0.33, 9)]:
        assert 1000 % total != 0 and impact_total_steps(steps, denoise) == total
        assert len(calculate_sigmas(ms, "ddim_uniform", total)) == total + 1
        impact = sigmas_for(ms, "euler", "ddim_uniform", steps, denoise, slicing="impact")
        assert torch.equal(impact, sigmas_for(ms, "euler", "ddim_uniform", steps, denoise))
    assert_sigmas(sigmas_for(ms, "euler", "ddim_uniform", 1, 0.3, slicing="impact"), at(1))


def test_total_steps_is_the_float_floor():
    assert impact_total_steps(7, 0.07) == 99  # 7 / 0.07 = 99.99999999999999, as int() in KSampler
    assert impact_total_steps(4, 0.6) == 6
    assert impact_total_steps(20, 1.0) == 20


def test_unknown_slicing_is_refused():
    with pytest.raises(ValueError, match="slicing"):
        sigmas_for(sd15(), "euler", "normal", 4, 0.5, slicing="a1111")  # type: ignore[arg-type]


# ------------------------------------------------------------------ Impact's Brownian-tree range


class TreeRanges:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ranges: list[tuple[float, float]] = []
        original = sampling_base.brownian_tree_noise

        def record(x, sigma_min, sigma_max, seed, cpu=True):  # noqa: ANN001, ANN202
            self.ranges.append((float(sigma_min), float(sigma_max)))
            return original(x, sigma_min, sigma_max, seed, cpu=cpu)

        monkeypatch.setattr(sampling_base, "brownian_tree_noise", record)

    def of(self, sampler_name: str, scheduler: str, steps: int, denoise: float, slicing: str) -> tuple[float, float]:
        self.ranges.clear()
        sample(lambda x, sigma, uncond: (x * 0.5, None), sd15(), sampler_name=sampler_name, scheduler=scheduler,
               steps=steps, denoise=denoise, seed=5, slicing=slicing)  # fmt: skip
        assert len(self.ranges) == 1
        return self.ranges[0]


def test_impact_sde_samplers_span_the_whole_schedule(monkeypatch: pytest.MonkeyPatch):
    ms = sd15()
    trees = TreeRanges(monkeypatch)
    whole = calculate_sigmas(ms, "karras", 8)  # steps 4, denoise 0.5
    for name in ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2m_sde_gpu"):
        # Impact: [sigma_min, sigma_max] of the 8-step schedule; KSampler: the run's [σ_7, σ_4]
        assert trees.of(name, "karras", 4, 0.5, "impact") == pytest.approx((float(ms.sigma_min), float(ms.sigma_max)))
        assert trees.of(name, "karras", 4, 0.5, "ksampler") == (float(whole[7]), float(whole[4]))
    # Impact leaves dpmpp_2m_sde_heun to ComfyUI: the run's own range in both modes
    assert trees.of("dpmpp_2m_sde_heun", "karras", 4, 0.5, "impact") == (float(whole[7]), float(whole[4]))


def test_impact_tree_sees_the_zero_written_through_its_cut(monkeypatch: pytest.MonkeyPatch):
    """ddim_uniform, steps 7, denoise 1: Impact zeroes σ(t=1) in the whole schedule too."""
    trees = TreeRanges(monkeypatch)
    low, high = trees.of("dpmpp_sde", "ddim_uniform", 7, 1.0, "impact")
    np.testing.assert_allclose([low, high], [sd15_table()[143], sd15_table()[995]], rtol=1e-6)
    _, whole = impact_schedule(sd15(), "ddim_uniform", 7, 1.0)
    assert float(whole[-2]) == 0.0 and len(whole) == 9


def test_impact_sde_run_differs_only_by_the_tree_range():
    ms = sd15()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))

    def run(sampler_name: str, slicing: str) -> torch.Tensor:
        return sample(lambda x, sigma, uncond: (x * 0.3, None), ms, sampler_name=sampler_name, scheduler="karras",
                      steps=4, denoise=0.5, seed=9, latent_image=latent, slicing=slicing)  # fmt: skip

    assert not torch.allclose(run("dpmpp_2m_sde", "impact"), run("dpmpp_2m_sde", "ksampler"))
    assert torch.equal(run("dpmpp_2m_sde_heun", "impact"), run("dpmpp_2m_sde_heun", "ksampler"))
    assert torch.equal(run("euler_ancestral", "impact"), run("euler_ancestral", "ksampler"))
