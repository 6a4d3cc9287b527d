"""Per-cycle arithmetic of the sampling hooks (reference §6.6, §9), computed from the reference formulas.

Impact's SimpleDetailerDenoiseSchedulerHook, InjectNoiseHookForDetailer (with ComfyUI Noise's
NoisyLatentImage/InjectNoise), UnsamplerDetailerHook (with its Unsampler),
VariationNoiseDetailerHookProvider and BlackPatchRetryHook.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from facedetailer.cycle_hooks import (
    inject_noise,
    mix_variation_noise,
    noise_injection_step,
    normalize_latent,
    retry_seeds,
    scheduled_denoise,
    should_retry_patch,
    unsampler_sigmas,
    unsampler_step,
)


def test_denoise_goes_linearly_from_the_request_value_to_the_target():
    assert [scheduled_denoise(0.8, 0.2, c, 4) for c in range(4)] == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert [scheduled_denoise(0.3, 0.9, c, 2) for c in range(2)] == pytest.approx([0.3, 0.9])
    assert scheduled_denoise(0.5, 0.1, 0, 1) == 0.5  # one cycle: unchanged


def injection(schedule: str, c: int, cycle: int, seed: int = 100):
    return noise_injection_step(schedule, seed, 2.0, 1.0, "CPU", c, cycle)


def test_noise_injection_skip_start_rests_on_cycle_zero_then_counts_from_one():
    assert injection("skip_start", 0, 3) is None
    first, second = injection("skip_start", 1, 3), injection("skip_start", 2, 3)
    # k = c − 1 of T = cycle − 1: seed = k + seed + k, strength = start + (end − start)·k/T
    assert (first.seed, first.strength) == (100, 2.0)
    assert (second.seed, second.strength) == (102, 1.5)


def test_noise_injection_from_start_acts_on_every_cycle():
    steps = [injection("from_start", c, 2) for c in range(2)]
    assert [(s.seed, s.strength, s.source) for s in steps] == [(100, 2.0, "CPU"), (102, 1.5, "CPU")]
    assert injection("from_start", 1, 2, seed=2**64 - 1).seed == 1  # wraps to a valid torch seed


def test_inject_noise_adds_scaled_noise_only_inside_the_mask():
    latent = np.array([1.0, 1.0, 1.0])
    noise = np.array([2.0, -2.0, 4.0])
    np.testing.assert_allclose(inject_noise(latent, noise, 0.5), [2.0, 0.0, 3.0])
    mask = np.array([1.0, 0.0, 0.25])
    np.testing.assert_allclose(inject_noise(latent, noise, 0.5, mask), [2.0, 1.0, 1.5])


def unsample(c: int, cycle: int, schedule: str = "skip_start", **overrides):
    values = {"steps": 25, "start_end_at_step": 21, "end_end_at_step": 24} | overrides
    return unsampler_step(
        schedule,
        values["steps"],
        values["start_end_at_step"],
        values["end_end_at_step"],
        1.0,
        "euler",
        "normal",
        False,
        c,
        cycle,
    )


def test_unsampler_end_at_step_schedule_and_last_step():
    assert unsample(0, 3) is None
    assert [(s.end_at_step, s.last_step) for s in (unsample(1, 3), unsample(2, 3))] == [(21, 4), (22, 3)]
    # from_start over 4 cycles: int(21 + 3·c/4) = 21, 21, 22, 23
    assert [unsample(c, 4, "from_start").end_at_step for c in range(4)] == [21, 21, 22, 23]
    # end_at_step is clamped to steps − 1, so at least one step runs
    assert unsample(0, 1, "from_start", steps=10, start_end_at_step=30, end_end_at_step=30).last_step == 1


def test_unsampler_sigmas_are_flipped_offset_and_cut_at_last_step():
    sigmas = [14.6, 5.0, 1.0, 0.0]
    np.testing.assert_allclose(unsampler_sigmas(sigmas, 4), [1e-4, 1.0001, 5.0001, 14.6001])
    np.testing.assert_allclose(unsampler_sigmas(sigmas, 2), [1e-4, 1.0001, 5.0001])


def test_normalize_uses_the_unbiased_std():
    latent = np.arange(6, dtype=np.float64).reshape(1, 2, 3)
    normalized = normalize_latent(latent)
    assert abs(normalized.mean()) < 1e-12
    assert normalized.std(ddof=1) == pytest.approx(1.0) and normalized.std(ddof=0) != pytest.approx(1.0)


def test_variation_noise_mixes_and_rescales():
    noise, variation = np.array([1.0, -2.0]), np.array([3.0, 0.5])
    np.testing.assert_allclose(mix_variation_noise(noise, variation, 0.0), noise)
    np.testing.assert_allclose(mix_variation_noise(noise, variation, 1.0), variation)
    expected = (0.7 * noise + 0.3 * variation) / math.sqrt(0.7**2 + 0.3**2)
    np.testing.assert_allclose(mix_variation_noise(noise, variation, 0.3), expected)


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.8])
def test_variation_noise_keeps_unit_variance(strength):
    rng = np.random.default_rng(0)
    noise, variation = rng.standard_normal(200_000), rng.standard_normal(200_000)
    mixed = mix_variation_noise(noise, variation, strength)
    assert mixed.var() == pytest.approx(1.0, abs=0.015)
    plain = (1 - strength) * noise + strength * variation
    assert plain.var() < 0.8, "without the rescaling the variance drops"


def test_black_patch_test_thresholds():
    black = np.zeros((16, 16, 3), np.uint8)
    assert should_retry_patch(black, 10, 5)
    assert should_retry_patch(black + 10, 10, 5)  # mean 10/255 ≤ 10/255
    assert not should_retry_patch(black + 11, 10, 5)
    assert should_retry_patch((black + 10).astype(np.float32) / 255, 10, 5)  # floats in [0, 1] too
    # the variance is compared with var_thresh/255 (not /255²): 0/20 stripes, variance ≈ 0.0015 ≤ 5/255
    stripes = black.copy()
    stripes[::2] = 20
    assert should_retry_patch(stripes, 10, 5)
    assert not should_retry_patch(stripes, 10, 0)


def test_black_patch_variance_is_the_unbiased_one():
    # grey values 0 and 60/255: biased variance 0.0138 ≤ 5/255 = 0.0196 < unbiased 0.0277
    patch = np.array([[[0, 0, 0], [60, 60, 60]]], np.uint8)
    assert not should_retry_patch(patch, 30, 5)
    assert should_retry_patch(patch, 30, 8)  # 8/255 = 0.031 ≥ 0.0277


def test_retry_seeds_add_the_attempt():
    assert retry_seeds(5, 3) == [5, 6, 7]
    assert retry_seeds(2**64 - 1, 2) == [2**64 - 1, 0]
