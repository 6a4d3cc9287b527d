"""The sampling detailer hooks inside the inpainter, by values from the reference formulas.

Each test records what reaches the sampler (denoise, initial noise, the latent a cycle starts
from, the unsampler's schedule) on the tiny random-weight SD model and compares it with the
formula of reference §6.6/§9 computed here independently.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import deployments.inpainter as inpainter_module
import deployments.inpainter_hooks as hooks_module
from deployments.inpainter import Inpainter, RefineJob, SamplingSettings, UnsupportedSamplerError
from deployments.sampling import sigmas_for
from deployments.sampling.noise import initial_noise
from facedetailer import cycle_hooks

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def inpainter(tiny_sd: dict) -> Inpainter:
    return Inpainter(tiny_sd["pipeline"], device="cpu", max_batch_size=8)


def crop(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def job(image: np.ndarray, seed: int = 5, mask: np.ndarray | None = None) -> RefineJob:
    return RefineJob(image=image, noise_mask=mask, positive=("a face",), negative=("blurry",), seed=seed)


def settings(hooks: list[dict], **values: object) -> SamplingSettings:
    return SamplingSettings.model_validate({"steps": 3, "denoise": 0.5, "cfg": 2.0, **values, "detailer_hooks": hooks})


class SamplerCalls:
    """Every ``crop_process`` call (cycles in the inpainter, unsampling in the hook stages) and its result."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        original = inpainter_module.crop_process

        def record(module_name: str):  # noqa: ANN202
            def crop_process(model_sampling, **kwargs):  # noqa: ANN001, ANN202
                entry = {"where": module_name, **kwargs}
                self.calls.append(entry)
                entry["result"] = yield from original(model_sampling, **kwargs)
                return entry["result"]

            return crop_process

        monkeypatch.setattr(inpainter_module, "crop_process", record("cycle"))
        monkeypatch.setattr(hooks_module, "crop_process", record("unsampler"))


def test_denoise_scheduler_over_three_cycles_reaches_the_sampler(inpainter: Inpainter, monkeypatch) -> None:
    calls = SamplerCalls(monkeypatch)
    hooks = [{"type": "denoise_scheduler", "target_denoise": 0.2}]
    inpainter.refine([job(crop())], settings(hooks, denoise=0.8, cycle=3))
    # denoise + (target − denoise)·c/(cycle − 1): 0.8, 0.5, 0.2
    assert [call["denoise"] for call in calls.calls] == pytest.approx([0.8, 0.5, 0.2], abs=1e-12)
    assert [call["seed"] for call in calls.calls] == [5, 6, 7]


def test_denoise_target_zero_leaves_the_last_cycle_unsampled(inpainter: Inpainter, monkeypatch) -> None:
    calls = SamplerCalls(monkeypatch)
    hooks = [{"type": "denoise_scheduler", "target_denoise": 0.0}]
    result = inpainter.refine_result([job(crop())], settings(hooks, denoise=0.6, cycle=3))
    assert [call["denoise"] for call in calls.calls] == pytest.approx([0.6, 0.3])
    assert result.unet_evaluations == [2 * 3], "two cycles of 3 steps; the third samples nothing"


def test_variation_noise_is_the_reference_mix(inpainter: Inpainter, monkeypatch) -> None:
    calls = SamplerCalls(monkeypatch)
    hooks = [{"type": "variation_noise", "seed": 77, "strength": 0.3}]
    inpainter.refine([job(crop())], settings(hooks, cycle=2))
    for cycle, call in enumerate(calls.calls):
        shape = tuple(call["latent_image"].shape)
        s = 0.3
        expected = ((1 - s) * initial_noise(shape, 5 + cycle) + s * initial_noise(shape, 77)) / math.sqrt(
            (1 - s) ** 2 + s**2
        )
        torch.testing.assert_close(call["noise"], expected, rtol=0, atol=1e-6)
        assert float(call["noise"].std()) == pytest.approx(1.0, abs=0.2)
    # strength 0 is the sampler's own noise, bit for bit
    calls.calls.clear()
    plain = inpainter.refine([job(crop())], settings([]))[0]
    zero = inpainter.refine([job(crop())], settings([{"type": "variation_noise", "seed": 77, "strength": 0.0}]))[0]
    assert np.array_equal(plain, zero)


def test_noise_injection_adds_strength_times_noise_inside_the_mask(inpainter: Inpainter, monkeypatch) -> None:
    calls = SamplerCalls(monkeypatch)
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1.0  # left half: latent columns 0-3 are 1, 4-7 are 0
    hooks = [{"type": "noise_injection", "seed": 10, "start_strength": 2.0, "end_strength": 1.0}]
    inpainter.refine([job(crop(), mask=mask)], settings(hooks, cycle=3, noise_mask_feather=0))
    first, second, third = calls.calls
    latent_mask = second["noise_mask"]
    assert latent_mask is not None
    # skip_start: cycle 0 untouched; cycle c ≥ 1 has k = c − 1 of T = 2: seed 10 + 2k, strength 2 − k/2
    for call, previous, k in ((second, first, 0), (third, second, 1)):
        noise = torch.randn(tuple(previous["result"].shape), generator=torch.Generator().manual_seed(10 + 2 * k))
        strength = 2.0 - k / 2
        expected = latent_mask * (previous["result"] + strength * noise) + (1 - latent_mask) * previous["result"]
        torch.testing.assert_close(call["latent_image"], expected, rtol=0, atol=1e-6)
        outside = latent_mask[0, 0] == 0
        assert torch.equal(call["latent_image"][..., outside], previous["result"][..., outside])
        inside = latent_mask[0, 0] == 1
        added = (call["latent_image"] - previous["result"])[..., inside]
        torch.testing.assert_close(added, strength * noise[..., inside], rtol=0, atol=1e-5)


def test_noise_injection_from_start_acts_before_cycle_zero_and_gpu_source_draws_on_the_cpu_here(
    inpainter: Inpainter, monkeypatch
) -> None:
    calls = SamplerCalls(monkeypatch)
    hooks = [{"type": "noise_injection", "schedule_for_cycle": "from_start", "source": "GPU", "seed": 3,
              "start_strength": 1.5, "end_strength": 1.5}]  # fmt: skip
    inpainter.refine([job(crop())], settings([]))
    [plain] = calls.calls
    calls.calls.clear()
    inpainter.refine([job(crop())], settings(hooks))
    [hooked] = calls.calls
    start = plain["latent_image"]
    noise = torch.randn(tuple(start.shape), generator=torch.Generator("cpu").manual_seed(3))
    torch.testing.assert_close(hooked["latent_image"], start + 1.5 * noise, rtol=0, atol=1e-6)


def test_unsampler_runs_the_reversed_sigmas(inpainter: Inpainter, monkeypatch) -> None:
    calls = SamplerCalls(monkeypatch)
    hooks = [{"type": "unsampler", "steps": 10, "start_end_at_step": 4, "end_end_at_step": 8, "cfg": 1.0,
              "sampler_name": "euler", "scheduler": "karras"}]  # fmt: skip
    result = inpainter.refine_result([job(crop())], settings(hooks, cycle=3))
    order = [call["where"] for call in calls.calls]
    assert order == ["cycle", "unsampler", "cycle", "unsampler", "cycle"], "skip_start: from cycle 1, before it"
    descending = sigmas_for(inpainter.model_sampling, "euler", "karras", 10, 1.0).numpy()
    # cycle c ≥ 1: k = c − 1 of 2; end_at_step = int(4 + 4·k/2) → 4, 6; last_step = 10 − end_at_step → 6, 4
    for call, last_step in ((calls.calls[1], 6), (calls.calls[3], 4)):
        expected = descending[::-1].astype(np.float64) + 1e-4
        expected = expected[: last_step + 1]
        np.testing.assert_allclose(call["sigmas"].numpy(), expected, rtol=1e-6)
        pure = cycle_hooks.unsampler_sigmas(descending, last_step)
        np.testing.assert_allclose(call["sigmas"].numpy(), pure, rtol=1e-6)
        assert call["sigmas"][0] == pytest.approx(1e-4) and bool(torch.all(call["sigmas"].diff() > 0))
        assert not torch.any(call["noise"]), "unsampling starts from the latent itself (zero noise)"
        assert call["differential"] is False and call["cfg"] == 1.0
    # each cycle after the first starts from the unsampler's result, which starts from the previous cycle's
    assert torch.equal(calls.calls[1]["latent_image"], calls.calls[0]["result"])
    assert torch.equal(calls.calls[2]["latent_image"], calls.calls[1]["result"])
    assert result.unet_evaluations == [3 * 3 + 6 + 4], "cycles' 3 steps each + the unsampler's 6 and 4"


def test_unsampler_normalize_gives_mean_zero_std_one(inpainter: Inpainter, monkeypatch) -> None:
    calls = SamplerCalls(monkeypatch)
    hooks = [{"type": "unsampler", "schedule_for_cycle": "from_start", "steps": 5, "start_end_at_step": 2,
              "end_end_at_step": 2, "normalize": "enable"}]  # fmt: skip
    inpainter.refine([job(crop())], settings(hooks))
    unsampled, cycle = calls.calls
    raw = unsampled["result"]
    expected = (raw - raw.mean()) / (raw - raw.mean()).std()
    torch.testing.assert_close(cycle["latent_image"], expected, rtol=0, atol=1e-6)
    assert float(cycle["latent_image"].mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(cycle["latent_image"].std()) == pytest.approx(1.0, abs=1e-5)


def test_unknown_unsampler_names_are_refused_before_model_work(inpainter: Inpainter) -> None:
    """Even at cycle 1, where skip_start never runs the unsampler: a bad name is bad input."""
    with pytest.raises(UnsupportedSamplerError, match=r"detailer_hooks\[0\] unsampler: sampler_name 'nope'"):
        inpainter.refine([job(crop())], settings([{"type": "unsampler", "sampler_name": "nope"}], cycle=1))
    with pytest.raises(UnsupportedSamplerError, match="unsampler.*scheduler 'nope'"):
        inpainter.refine([job(crop())], settings([{"type": "unsampler", "scheduler": "nope"}], cycle=2))
    # a schedule the denoise hook makes too long (10000 steps / 0.001) is refused naming the cycle
    too_small = [{"type": "denoise_scheduler", "target_denoise": 0.001}]
    with pytest.raises(UnsupportedSamplerError, match=r"cycle 1 \(after the detailer hooks\).*too long"):
        inpainter.refine([job(crop())], settings(too_small, steps=10000, cycle=2))


def test_hooked_crops_share_unet_calls_and_match_their_lone_runs(inpainter: Inpainter) -> None:
    """Continuous batching keeps working: hooked and plain crops batch, results equal lone runs."""
    plain = settings([], cycle=2)
    hooked = settings(
        [{"type": "variation_noise", "seed": 9, "strength": 0.5},
         {"type": "noise_injection", "seed": 4},
         {"type": "unsampler", "steps": 4, "start_end_at_step": 2, "end_end_at_step": 2}],
        cycle=2,
    )  # fmt: skip
    jobs = [job(crop(seed=1)), job(crop(seed=2))]
    jobs[0].settings, jobs[1].settings = plain, hooked
    before = dict(inpainter.engine.stats.unet_batch_sizes)
    together = inpainter.refine(jobs)
    shared = {size: count - before.get(size, 0) for size, count in inpainter.engine.stats.unet_batch_sizes.items()}
    assert shared.get(2, 0) >= 3, "the two crops shared UNet calls"
    alone = [inpainter.refine([one])[0] for one in jobs]
    assert all(np.array_equal(a, b) for a, b in zip(together, alone, strict=True))
    assert not np.array_equal(together[0], together[1])
