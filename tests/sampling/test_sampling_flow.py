"""Sampling under rectified-flow (CONST) and v-prediction model sampling.

The RF ancestral samplers and the CONST exponential integrator are re-derived here in float64
from their formulas; the flow marginal, the first-sigma offset, the noised original under a
mask, uni_pc's end and the interleaving of crops of different kinds are checked directly.
"""

from __future__ import annotations

import math

import pytest
import torch
from sampling_helpers import FlowToyDenoiser, ToyDenoiser

from deployments.sampling import (
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    ModelSampling,
    UNetRequest,
    UNetResponse,
    crop_process,
    sample,
    sampling_process,
    sigmas_for,
)
from deployments.sampling.base import Denoiser, SamplerEnv, differential_mask
from deployments.sampling.noise import initial_noise
from deployments.sampling.process import drive
from deployments.sampling.unipc import uni_pc

SHAPE = (1, 4, 8, 8)
LATENT = torch.randn(SHAPE, generator=torch.Generator().manual_seed(21)) * 0.8
SD3 = ModelSampling.for_comfy_model("SD3")
FLUX = ModelSampling.for_comfy_model("Flux")
SCHNELL = ModelSampling.for_comfy_model("FluxSchnell")
VZSNR = ModelSampling.from_comfy("discrete", "v_prediction", zsnr=True)
FLOWS = {"sd3": SD3, "flux": FLUX, "schnell": SCHNELL}


class Recorder:
    """A denoiser function that records the sigmas and inputs it is called with."""

    def __init__(self, toy: ToyDenoiser) -> None:
        self.toy, self.sigmas, self.inputs = toy, [], []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, need_uncond: bool):
        self.sigmas.append(float(sigma))
        self.inputs.append(x.clone())
        return self.toy(x, sigma, need_uncond)


def _start(ms: ModelSampling, sampler: str, scheduler: str, steps: int, seed: int) -> tuple[torch.Tensor, list[float]]:
    """The flow start latent σ₀·noise + (1 − σ₀)·latent, in float64, and the run's sigmas."""
    sigmas = sigmas_for(ms, sampler, scheduler, steps, 1.0).double().tolist()
    noise = initial_noise(SHAPE, seed).double()
    return sigmas[0] * noise + (1 - sigmas[0]) * LATENT.double(), sigmas


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_euler_ancestral_rf_matches_an_independent_derivation(name: str):
    """σ_down = σ_next²/σ (η = 1); interpolate to σ_down; rescale by α_next/α_down; renoise."""
    ms, toy, seed = FLOWS[name], FlowToyDenoiser(SHAPE), 5
    ours = sample(toy, ms, sampler_name="euler_ancestral", scheduler="simple", steps=5, seed=seed, latent_image=LATENT)
    x, sigmas = _start(ms, "euler_ancestral", "simple", 5, seed)
    draws = torch.Generator().manual_seed(seed + 1)  # ComfyUI's CPU ancestral generator (PR #11528)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        denoised = toy.predict(x.float(), torch.tensor(sigma), toy.target).double()
        if sigma_next == 0:
            x = denoised
            continue
        sigma_down = sigma_next**2 / sigma
        x = sigma_down / sigma * x + (1 - sigma_down / sigma) * denoised
        alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
        spread = math.sqrt(sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2)
        x = alpha_next / alpha_down * x + torch.randn(SHAPE, generator=draws).double() * spread
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-5)


def test_dpmpp_2s_ancestral_rf_matches_an_independent_derivation():
    """λ = log((1 − σ)/σ), midpoint σ_s = 1/(1 + e^λ_s) (0.9999 from σ = 1), interpolation steps."""
    ms, toy, seed = SD3, FlowToyDenoiser(SHAPE), 9
    recorder = Recorder(toy)
    ours = sample(recorder, ms, sampler_name="dpmpp_2s_ancestral", scheduler="normal", steps=4, seed=seed,
                  latent_image=LATENT)  # fmt: skip
    x, sigmas = _start(ms, "dpmpp_2s_ancestral", "normal", 4, seed)
    draws = torch.Generator().manual_seed(seed + 1)
    expected_calls = []

    def predict(value: torch.Tensor, sigma: float) -> torch.Tensor:
        expected_calls.append(sigma)
        return toy.predict(value.float(), torch.tensor(sigma), toy.target).double()

    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        denoised = predict(x, sigma)
        sigma_down = sigma_next**2 / sigma
        if sigma_next == 0:
            x = denoised
            continue
        if sigma == 1.0:
            sigma_s = 0.9999
        else:
            lam, lam_down = math.log((1 - sigma) / sigma), math.log((1 - sigma_down) / sigma_down)
            sigma_s = 1 / (1 + math.exp((lam + lam_down) / 2))
        u = sigma_s / sigma * x + (1 - sigma_s / sigma) * denoised
        x = sigma_down / sigma * x + (1 - sigma_down / sigma) * predict(u, sigma_s)
        alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
        spread = math.sqrt(sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2)
        x = alpha_next / alpha_down * x + torch.randn(SHAPE, generator=draws).double() * spread
    assert sigmas[0] == 1.0 and recorder.sigmas[1] == pytest.approx(0.9999, abs=1e-7)
    assert recorder.sigmas == pytest.approx(expected_calls, rel=1e-6)
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-5)


class PointDenoiser:
    """The exact x0 for data that is a single point: every x0 prediction is that point."""

    def __init__(self, point: torch.Tensor) -> None:
        self.point = point

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, need_uncond: bool):
        return self.point.clone(), (self.point.clone() if need_uncond else None)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"])
def test_rf_ancestral_steps_keep_the_flow_marginal(sampler: str):
    """With exact x0, x at every call is (1 − σ)·x0 + σ·z with z standard normal, as for a fresh noising.

    An eps-style ancestral step (x0 + σ·z) would leave z's mean at σ·x0/σ ≠ 0 here.
    """
    shape = (1, 4, 64, 64)
    point = 2.0 + torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.1
    recorder = Recorder(PointDenoiser(point))  # type: ignore[arg-type]
    final = sample(recorder, SD3, sampler_name=sampler, scheduler="simple", steps=6, seed=4, shape=shape)
    torch.testing.assert_close(final, point, rtol=1e-5, atol=1e-5)
    for sigma, x in zip(recorder.sigmas, recorder.inputs, strict=True):
        z = (x - (1 - sigma) * point) / sigma
        assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03, (sampler, sigma)


# the samplers that call ComfyUI's model-aware half-logSNR and offset a CONST run's first sigma
OFFSET_SAMPLERS = ("dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
                   "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "er_sde", "seeds_2", "seeds_3",
                   "sa_solver", "sa_solver_pece", "exp_heun_2_x0", "exp_heun_2_x0_sde")  # fmt: skip


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_a_const_run_from_sigma_one_starts_where_comfyui_starts(sampler: str):
    for ms in (SD3, FLUX):
        recorder = Recorder(FlowToyDenoiser(SHAPE))
        sample(recorder, ms, sampler_name=sampler, scheduler="simple", steps=4, seed=2, latent_image=LATENT)
        first = recorder.sigmas[0]
        if sampler in OFFSET_SAMPLERS:  # log((1 − σ)/σ) = −∞ at σ = 1: percent_to_sigma(1e-4) instead
            assert first == float(torch.tensor(ms.percent_to_sigma(1e-4))) and first < 1.0
        elif sampler not in ("dpm_fast", "dpm_adaptive"):
            assert first == 1.0
    recorder = Recorder(ToyDenoiser(SHAPE))  # eps/v: no offset
    sample(recorder, VZSNR, sampler_name=sampler, scheduler="simple", steps=4, seed=2, latent_image=LATENT)
    if sampler not in ("dpm_fast", "dpm_adaptive", "uni_pc", "uni_pc_bh2"):
        assert recorder.sigmas[0] == float(VZSNR.sigma_max)


def test_exp_heun_under_const_is_the_flow_exponential_integrator():
    """exp_heun_2_x0 (seeds_2, r = 1, φ₂) with λ = log((1 − σ)/σ) and α = 1 − σ, re-derived."""
    ms, toy = FLUX, FlowToyDenoiser(SHAPE)
    ours = sample(toy, ms, sampler_name="exp_heun_2_x0", scheduler="karras", steps=5, cfg=1.0, seed=3,
                  latent_image=LATENT)  # fmt: skip
    x, sigmas = _start(ms, "exp_heun_2_x0", "karras", 5, 3)
    sigmas[0] = float(torch.tensor(ms.percent_to_sigma(1e-4)))  # karras starts at σ_max = 1

    def lam(sigma: float) -> float:
        return math.log((1 - sigma) / sigma)

    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        start = sigmas[0] if i == 0 else sigma
        denoised = toy.predict(x.float(), torch.tensor(start), toy.target).double()
        if sigma_next == 0:
            x = denoised
            continue
        h = lam(sigma_next) - lam(start)
        alpha_next = 1 - sigma_next
        x_2 = sigma_next / start * x - alpha_next * math.expm1(-h) * denoised
        denoised_2 = toy.predict(x_2.float(), torch.tensor(sigma_next), toy.target).double()
        b2 = (math.expm1(-h) + h) / -h
        b1 = math.expm1(-h) - b2
        x = sigma_next / start * x - alpha_next * (b1 * denoised + b2 * denoised_2)
    torch.testing.assert_close(ours.double(), x, rtol=1e-4, atol=1e-5)


def _flow_unet(toy: FlowToyDenoiser, requests: list[UNetRequest]):
    """A raw velocity-predicting model: out = (x − x0)/σ, x the model input (CONST has no c_in)."""

    def unet(request: UNetRequest) -> UNetResponse:
        requests.append(request)
        sigma = torch.tensor(request.sigma)
        velocity = lambda target: (request.x_in - toy.predict(request.x_in, sigma, target)) / sigma  # noqa: E731
        return UNetResponse(cond=velocity(toy.target), uncond=velocity(toy.uncond_target) if request.uncond else None)

    return unet


def _run(process, unet) -> torch.Tensor:
    try:
        request = next(process)
        while True:
            request = process.send(unet(request))
    except StopIteration as done:
        return done.value


def test_noise_mask_under_const_keeps_the_flow_noised_original():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    requests: list[UNetRequest] = []
    toy = FlowToyDenoiser(SHAPE)
    final = _run(crop_process(SD3, sampler_name="euler", scheduler="normal", steps=5, denoise=0.7, cfg=2.0, seed=8,
                              latent_image=LATENT, noise_mask=mask, differential=False),
                 _flow_unet(toy, requests))  # fmt: skip
    noise = initial_noise(SHAPE, 8)
    held = (mask == 0).expand(SHAPE)
    for request in requests:
        sigma = request.sigma
        assert request.timestep == pytest.approx(sigma * 1000, rel=1e-6)  # SD3's DiT gets σ·1000
        expected = sigma * noise + (1 - sigma) * LATENT  # the model input is x itself: no c_in
        torch.testing.assert_close(request.x_in[held], expected[held], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final[held], LATENT[held], rtol=1e-6, atol=1e-6)
    assert (final - LATENT)[~held].abs().max() > 1e-2


def test_differential_diffusion_under_flow_uses_the_continuous_timesteps():
    sigmas = sigmas_for(SD3, "euler", "normal", 6, 1.0)
    mask = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8)
    sigma_to = float(SD3.sigma_min)  # the last sigma is 0: sigma_min is the lower end
    for sigma in sigmas[1:-1]:
        threshold = (float(sigma) - sigma_to) / (float(sigmas[0]) - sigma_to)  # σ·1000 cancels
        expected = (mask >= threshold).float()
        away = (mask - threshold).abs() > 1e-5
        got = differential_mask(SD3, sigmas, sigma, mask)
        assert torch.equal(got[away], expected[away])
    # flux: the model gets σ, and its sigma_min (3.2e-4) is below a uni_pc run's last sigma (0.001)
    flux_sigmas = torch.tensor([1.0, 0.5, 0.001])
    got = differential_mask(FLUX, flux_sigmas, torch.tensor(0.5), mask)
    assert torch.equal(got, (mask >= (0.5 - 0.001) / (1.0 - 0.001)).float())


@pytest.mark.parametrize("ms", [SD3, FLUX, VZSNR], ids=["sd3", "flux", "v-zsnr"])
def test_uni_pc_ends_with_the_inverse_noise_scaling_at_0_001(ms: ModelSampling):
    """ComfyUI writes uni_pc's last sigma 0.001 into the run's sigmas: a CONST run ends divided by 0.999."""
    toy = FlowToyDenoiser(SHAPE) if ms.is_const else ToyDenoiser(SHAPE)
    final = sample(toy, ms, sampler_name="uni_pc", scheduler="simple", steps=5, seed=6, latent_image=LATENT)
    sigmas = sigmas_for(ms, "uni_pc", "simple", 5, 1.0)
    noise = initial_noise(SHAPE, 6)
    denoiser = Denoiser(ms, cfg=1.0, sigmas=sigmas, latent_image=LATENT, inpaint_noise=noise, denoise_mask=None,
                        differential=False, always_uncond=False)  # fmt: skip
    start = ms.noise_scaling(sigmas[0], noise, LATENT, max_denoise=True)
    raw = drive(uni_pc(denoiser, start, sigmas, SamplerEnv(model_sampling=ms, seed=6)), toy)
    assert float(sigmas[-1]) == pytest.approx(0.001)
    expected = raw / (1.0 - torch.tensor(0.001)) if ms.is_const else raw
    assert torch.equal(final, expected)


def _raw_output(ms: ModelSampling, toy: ToyDenoiser, request: UNetRequest, target: torch.Tensor) -> torch.Tensor:
    """What a model of this prediction would output for the toy's x0 (the inverse of calculate_denoised)."""
    sigma = torch.tensor(request.sigma)
    if ms.is_const:
        return (request.x_in - toy.predict(request.x_in, sigma, target)) / sigma
    x = request.x_in * (sigma**2 + 1) ** 0.5
    x0 = toy.predict(x, sigma, target)
    if ms.prediction == "v_prediction":
        return (x / (sigma**2 + 1) - x0) * (sigma**2 + 1) ** 0.5 / sigma
    return (x - x0) / sigma


def test_crops_of_different_kinds_interleaved_equal_each_alone():
    mask = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    configs = [
        (VZSNR, ToyDenoiser(SHAPE), dict(sampler_name="dpmpp_2m_sde", scheduler="karras", steps=5, denoise=1.0)),
        (SD3, FlowToyDenoiser(SHAPE), dict(sampler_name="euler_ancestral", scheduler="simple", steps=4, denoise=0.6)),
        (FLUX, FlowToyDenoiser(SHAPE), dict(sampler_name="seeds_2", scheduler="beta", steps=3, denoise=1.0)),
        (SCHNELL, FlowToyDenoiser(SHAPE), dict(sampler_name="uni_pc", scheduler="normal", steps=4, denoise=0.8)),
    ]

    def make(config):
        ms, _, options = config
        return crop_process(ms, cfg=3.0, seed=7, latent_image=LATENT, noise_mask=mask, differential=True, **options)

    def respond(config, request):
        ms, toy, _ = config
        uncond = _raw_output(ms, toy, request, toy.uncond_target) if request.uncond else None
        return UNetResponse(cond=_raw_output(ms, toy, request, toy.target), uncond=uncond)

    alone = [_run(make(config), lambda r, c=config: respond(c, r)) for config in configs]
    processes = [make(config) for config in configs]
    pending = {i: next(p) for i, p in enumerate(processes)}
    together: dict[int, torch.Tensor] = {}
    while pending:
        for i in list(pending):
            try:
                pending[i] = processes[i].send(respond(configs[i], pending[i]))
            except StopIteration as done:
                together[i] = done.value
                del pending[i]
    for i, latent in enumerate(alone):
        assert torch.equal(latent, together[i])
        assert torch.isfinite(latent).all() and (latent - LATENT).abs().max() > 1e-3


@pytest.mark.parametrize("ms", [SD3, FLUX, VZSNR], ids=["sd3", "flux", "v-zsnr"])
def test_per_sample_conversions_equal_one_sample_at_a_time(ms: ModelSampling):
    generator = torch.Generator().manual_seed(2)
    x, out, latent = (torch.randn(3, 4, 5, 5, generator=generator) for _ in range(3))
    sigmas = torch.tensor([0.9, 0.4, 0.05])
    whole = (ms.calculate_input(sigmas, x), ms.calculate_denoised(sigmas, out, x),
             ms.noise_scaling(sigmas, out, latent), ms.inverse_noise_scaling(sigmas, latent))  # fmt: skip
    for row in range(3):
        s = sigmas[row]
        one = (ms.calculate_input(s, x[row : row + 1]), ms.calculate_denoised(s, out[row : row + 1], x[row : row + 1]),
               ms.noise_scaling(s, out[row : row + 1], latent[row : row + 1]),
               ms.inverse_noise_scaling(s, latent[row : row + 1]))  # fmt: skip
        for batched, single in zip(whole, one, strict=True):
            assert torch.equal(batched[row : row + 1], single)


KINDS = {"v-zsnr": (VZSNR, ToyDenoiser), "sd3": (SD3, FlowToyDenoiser), "flux": (FLUX, FlowToyDenoiser),
         "schnell": (SCHNELL, FlowToyDenoiser)}  # fmt: skip


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_pair_runs_under_every_kind(sampler: str):
    """Finite, moved from the input, changed by the seed, for every scheduler and kind."""
    for kind, (ms, toy_class) in KINDS.items():
        for scheduler in SCHEDULER_NAMES:
            options = dict(sampler_name=sampler, scheduler=scheduler, steps=4, denoise=0.6, cfg=4.0,
                           latent_image=LATENT)  # fmt: skip
            first = sample(toy_class(SHAPE), ms, seed=1, **options)
            assert torch.isfinite(first).all(), (kind, scheduler)
            assert (first - LATENT).abs().max() > 1e-3, (kind, scheduler)
            assert (first - sample(toy_class(SHAPE), ms, seed=2, **options)).abs().max() > 1e-4, (kind, scheduler)


def test_sampling_process_reports_calls_at_flow_sigmas():
    process = sampling_process(FLUX, sampler_name="euler", scheduler="simple", steps=3, denoise=1.0, cfg=1.0, seed=0,
                               latent_image=LATENT)  # fmt: skip
    call = next(process)
    assert float(call.sigma) == 1.0 and not call.uncond
    process.close()
