"""Per-step progress of the inpainter's crops (``on_progress``): what ComfyUI's progress callback sees.

On the tiny SD model: every cycle of every crop reports steps 1…n in order, the last report's x0
is the latent the crop is decoded from (Impact returns that x0), and listening changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.inpainter import Inpainter, RefineJob, SamplingSettings
from deployments.inpainter_engine import CropProgress
from deployments.sampling import sigmas_for

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def inpainter(tiny_sd: dict) -> Inpainter:
    return Inpainter(tiny_sd["pipeline"], device="cpu", max_batch_size=8)


def jobs() -> list[RefineJob]:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)]
    return [RefineJob(image=image, noise_mask=None, positive=("a face",), negative=("",), seed=7 + i)
            for i, image in enumerate(images)]  # fmt: skip


def run(inpainter: Inpainter, settings: SamplingSettings, listener=None) -> list[np.ndarray]:
    request = inpainter.submit(jobs(), settings, on_progress=listener)
    return inpainter.engine.wait(request)


@pytest.mark.parametrize(
    ("sampler", "steps", "denoise", "cycle"),
    [("euler", 4, 0.5, 2), ("heun", 3, 1.0, 1), ("dpm_2", 5, 0.5, 1), ("dpm_2", 4, 1.0, 1)],
)
def test_every_cycle_of_every_crop_reports_steps_one_to_n(inpainter, sampler, steps, denoise, cycle):
    run_steps = len(sigmas_for(inpainter.model_sampling, sampler, "normal", steps, denoise, slicing="impact")) - 1
    events: list[CropProgress] = []
    settings = SamplingSettings(steps=steps, denoise=denoise, cfg=7.0, sampler_name=sampler, cycle=cycle)
    run(inpainter, settings, events.append)
    for index in (0, 1):
        for number in range(cycle):
            mine = [(event.step, event.steps) for event in events if event.index == index and event.cycle == number]
            assert mine == [(i, run_steps) for i in range(1, run_steps + 1)], (index, number, mine)
    assert {event.cycles for event in events} == {cycle}


def test_the_last_reported_x0_is_what_the_crop_is_decoded_from(inpainter, monkeypatch):
    last: dict[int, torch.Tensor] = {}
    decoded: list[torch.Tensor] = []
    original = inpainter._decode

    def decode(latents: torch.Tensor) -> torch.Tensor:
        decoded.extend(latent.clone() for latent in latents)
        return original(latents)

    monkeypatch.setattr(inpainter, "_decode", decode)
    run(
        inpainter,
        SamplingSettings(steps=3, denoise=0.5, cfg=7.0),
        lambda event: last.update({event.index: event.latent.clone()}),
    )
    assert len(decoded) == 2
    for latent in decoded:
        assert any(torch.equal(latent, x0[0]) for x0 in last.values())


def test_listening_changes_no_result_and_a_failing_listener_fails_nothing(inpainter):
    settings = SamplingSettings(steps=3, denoise=0.5, cfg=7.0, sampler_name="dpmpp_2m")
    quiet = run(inpainter, settings)
    calls: list[int] = []

    def broken(event: CropProgress) -> None:
        calls.append(event.step)
        raise RuntimeError("listener bug")

    loud = run(inpainter, settings, broken)
    assert calls == [1], "a failing listener is silenced after its first failure"
    for a, b in zip(quiet, loud, strict=True):
        assert np.array_equal(a, b)
