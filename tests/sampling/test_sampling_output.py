"""``output="denoised"``: the x0 ComfyUI's sampler last passed to its progress callback.

Impact Pack's ``separated_sample`` (FaceDetailer's path, ``return_with_leftover_noise`` off)
returns that x0 (``process_latent_out`` of what the preview callback last received), not the
sampler's final latent. Where a sampler's last step lands on its prediction the two are the same
tensor; dpm_fast/dpm_adaptive recompute x0 from eps, UniPC reports its previous step's data
prediction and sa_solver_pece the prediction before its PECE re-evaluation.
"""

from __future__ import annotations

import math

import pytest
import torch
from sampling_helpers import ToyDenoiser, k_diffusion_sampling, sd15

from deployments.sampling import SAMPLER_NAMES, sample, sampling_process, sigmas_for
from deployments.sampling.base import Prediction
from deployments.sampling.noise import initial_noise

SHAPE = (1, 4, 8, 8)
SEED = 7
CFG = 3.5
# last callback x0 ≠ final latent
APART = {"dpm_fast", "dpm_adaptive", "sa_solver_pece", "uni_pc", "uni_pc_bh2"}


def latent() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)) * 0.8


def soft_mask() -> torch.Tensor:
    mask = torch.rand((1, 1) + SHAPE[-2:], generator=torch.Generator().manual_seed(6))
    mask[..., :2, :] = 0.0  # cells the sampler must leave alone
    return mask


def both(name: str, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    settings = {"sampler_name": name, "scheduler": "karras", "steps": 6, "denoise": 0.6, "cfg": CFG, "seed": SEED,
                "latent_image": latent(), "slicing": "impact", **kwargs}  # fmt: skip
    final = sample(ToyDenoiser(SHAPE), sd15(), **settings)
    denoised = sample(ToyDenoiser(SHAPE), sd15(), output="denoised", **settings)
    assert torch.isfinite(final).all() and torch.isfinite(denoised).all()
    return final, denoised


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "soft-mask"])
@pytest.mark.parametrize("name", [name for name in SAMPLER_NAMES if name not in APART])
def test_samplers_whose_last_step_lands_on_the_prediction_return_it(name: str, masked: bool) -> None:
    mask = soft_mask() if masked else None
    final, denoised = both(name, noise_mask=mask, differential=masked)
    # mostly the same tensor; some last steps reach it through arithmetic that rounds (x + d·(0 − σ))
    torch.testing.assert_close(denoised, final, rtol=0, atol=1e-6)
    assert float((final - latent()).abs().max()) > 1e-2  # the run moved


@pytest.mark.parametrize("name", sorted(APART))
def test_the_other_samplers_return_a_different_x0_that_keeps_the_mask(name: str) -> None:
    """KSamplerX0Inpaint blends the prediction the callback sees: mask-0 cells are the original."""
    final, denoised = both(name, noise_mask=soft_mask(), differential=False)
    assert float((final - denoised).abs().max()) > 1e-4
    keep = (soft_mask() == 0).expand(SHAPE)
    # (dpm_fast/dpm_adaptive recompute x0 from eps and UniPC converts from the VP view: round-off)
    torch.testing.assert_close(denoised[keep], latent()[keep], rtol=0, atol=1e-5)


def start(sigmas: torch.Tensor) -> torch.Tensor:
    ms = sd15()
    max_denoise = math.isclose(float(ms.sigma_max), float(sigmas[0]), rel_tol=1e-5)
    return ms.noise_scaling(sigmas[0], initial_noise(SHAPE, SEED), latent(), max_denoise)


def k_diffusion_last_callback(name: str, sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's run of the same sampler, keeping what its callback last received."""
    kd = k_diffusion_sampling()
    seen: list[torch.Tensor] = []
    kwargs = {"disable": True, "callback": lambda info: seen.append(info["denoised"])}
    model, x = ToyDenoiser(SHAPE).k_model(CFG), start(sigmas)
    if name in ("dpm_fast", "dpm_adaptive"):  # ComfyUI: from sigmas[0] to the last non-zero sigma
        sigma_min = sigmas[-1] if sigmas[-1] > 0 else sigmas[-2]
        if name == "dpm_fast":
            kd.sample_dpm_fast(model, x, sigma_min, sigmas[0], len(sigmas) - 1, **kwargs)
        else:
            kd.sample_dpm_adaptive(model, x, sigma_min, sigmas[0], **kwargs)
    else:
        getattr(kd, f"sample_{name}")(model, x, sigmas, **kwargs)
    assert seen
    return seen[-1]


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive", "euler", "heun", "dpmpp_2m"])
def test_denoised_is_k_diffusions_last_callback_x0(name: str) -> None:
    sigmas = sigmas_for(sd15(), name, "karras", 6, 0.6, slicing="impact")
    final, denoised = both(name)
    torch.testing.assert_close(denoised, k_diffusion_last_callback(name, sigmas), rtol=1e-5, atol=1e-5)
    if name.startswith("dpm_"):
        assert float((final - denoised).abs().max()) > 1e-3


def recorded_predictions(name: str, steps: int = 6) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(cfg-combined prediction of every model call, final latent, denoised output) of one run."""
    toy, predictions = ToyDenoiser(SHAPE), []
    outputs = []
    for output in ("latent", "denoised"):
        predictions.clear()
        process = sampling_process(sd15(), sampler_name=name, scheduler="karras", steps=steps, denoise=0.6, cfg=CFG,
                                   seed=SEED, latent_image=latent(), slicing="impact", output=output)  # fmt: skip
        try:
            call = next(process)
            while True:
                cond, uncond = toy(call.x, call.sigma, True)
                predictions.append(uncond + (cond - uncond) * CFG)
                call = process.send(Prediction(cond=cond, uncond=uncond))
        except StopIteration as stop:
            outputs.append(stop.value)
    return list(predictions), outputs[0], outputs[1]


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_uni_pc_returns_its_last_evaluated_prediction(name: str) -> None:
    """ComfyUI's UniPC reports model_prev_list[-1]: the data prediction of its last model call
    (at the second-to-last sigma; the final step to 0.001 evaluates nothing)."""
    predictions, final, denoised = recorded_predictions(name)
    assert len(predictions) == 6
    torch.testing.assert_close(denoised, predictions[-1], rtol=1e-5, atol=1e-5)
    assert float((final - denoised).abs().max()) > 1e-5


def test_sa_solver_pece_returns_the_prediction_before_its_last_re_evaluation() -> None:
    predictions, final, denoised = recorded_predictions("sa_solver_pece")
    assert torch.equal(denoised, predictions[-2])
    assert float((predictions[-1] - predictions[-2]).abs().max()) > 1e-3
    assert float((final - denoised).abs().max()) > 1e-4


def test_an_unsampled_run_returns_the_latent_either_way() -> None:
    ms = sd15()
    process = sampling_process(ms, sampler_name="dpm_fast", scheduler="ddim_uniform", steps=20, denoise=0.01, cfg=1.0,
                               seed=SEED, latent_image=latent(), slicing="impact", output="denoised")  # fmt: skip
    with pytest.raises(StopIteration) as stop:
        next(process)
    assert torch.equal(stop.value.value, latent())


def test_an_unknown_output_is_refused() -> None:
    with pytest.raises(ValueError, match="output must be one of latent, denoised"):
        sampling_process(sd15(), sampler_name="euler", scheduler="karras", steps=4, denoise=1.0, cfg=1.0, seed=0,
                         latent_image=latent(), output="x0")  # fmt: skip
