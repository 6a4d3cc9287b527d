"""ComfyUI's model-sampling kinds and predictions against numbers derived from the published formulas.

Tables are recomputed here in float64 numpy from the formulas (not from our code), conversions are
checked on constructed (x0, noise) pairs, so an error in a table, a timestep or a prediction's
arithmetic fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deployments.sampling import ModelSampling
from deployments.sampling.model_sampling import COMFY_MODELS, flux_shift


def _discrete_sigmas(betas: np.ndarray) -> np.ndarray:
    alphas_cumprod = np.cumprod(1 - betas)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def test_discrete_tables_follow_comfyui_beta_schedule_names():
    n = 1000
    linear = np.linspace(0.00085**0.5, 0.012**0.5, n) ** 2  # ComfyUI "linear" = diffusers scaled_linear
    sqrt_linear = np.linspace(0.0001, 0.02, n)
    steps = np.arange(n + 1) / n + 0.008
    alpha_bar = np.cos(steps / 1.008 * np.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    cosine = np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0, 0.999)
    for settings, betas in (
        ({}, linear),
        ({"beta_schedule": "sqrt_linear", "linear_start": 0.0001, "linear_end": 0.02}, sqrt_linear),
        ({"beta_schedule": "cosine"}, cosine),
    ):
        ms = ModelSampling.from_comfy("discrete", "eps", **settings)
        np.testing.assert_allclose(ms.sigmas.numpy(), _discrete_sigmas(betas), rtol=2e-6)
        assert ms.kind == "discrete" and ms.prediction == "eps" and not ms.is_const
    with pytest.raises(ValueError, match="ComfyUI's 'linear' is diffusers' scaled_linear"):
        ModelSampling.from_comfy("discrete", "eps", beta_schedule="scaled_linear")


def test_zsnr_rescales_to_zero_terminal_snr_with_comfyuis_last_sigma():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    sqrt_ab = np.sqrt(np.cumprod(1 - betas))
    rescaled = (sqrt_ab - sqrt_ab[-1]) * sqrt_ab[0] / (sqrt_ab[0] - sqrt_ab[-1])  # Lin et al. 2023, Alg. 1
    alpha_bar = rescaled**2
    alpha_bar[-1] = 4.8973451890853435e-08  # ComfyUI: a finite last sigma instead of infinity
    expected = np.sqrt((1 - alpha_bar) / alpha_bar)
    ms = ModelSampling.from_comfy("discrete", "v_prediction", zsnr=True)
    np.testing.assert_allclose(ms.sigmas.numpy(), expected, rtol=2e-6)
    assert float(ms.sigma_max) == pytest.approx(4518.76, rel=1e-5)
    assert float(ms.sigma_min) == pytest.approx(float(ModelSampling.from_comfy("discrete", "eps").sigma_min), rel=1e-6)
    assert ms.describe()["zsnr"] is True and ms.prediction == "v_prediction"


@pytest.mark.parametrize(("shift", "multiplier"), [(3.0, 1000), (1.73, 1.0), (1.0, 1.0)])
def test_discrete_flow_table_timestep_and_percent_follow_the_shift_formula(shift: float, multiplier: float):
    ms = ModelSampling.from_comfy("discrete_flow", "const", shift=shift, multiplier=multiplier)
    t = np.arange(1, 1001) / 1000
    expected = shift * t / (1 + (shift - 1) * t)  # SD3 paper eq. 23: σ' = s·σ / (1 + (s − 1)·σ)
    np.testing.assert_allclose(ms.sigmas.numpy(), expected, rtol=1e-6)
    assert ms.kind == "discrete_flow" and ms.is_const
    assert float(ms.sigma_max) == 1.0
    sigma = torch.tensor(0.3125)
    assert float(ms.timestep(sigma)) == pytest.approx(0.3125 * multiplier, rel=1e-7)  # the model gets σ·multiplier
    assert float(ms.sigma(ms.timestep(sigma))) == pytest.approx(shift * 0.3125 / (1 + (shift - 1) * 0.3125), rel=1e-6)
    assert ms.percent_to_sigma(0.0) == 1.0 and ms.percent_to_sigma(1.0) == 0.0
    assert ms.percent_to_sigma(0.25) == pytest.approx(shift * 0.75 / (1 + (shift - 1) * 0.75), rel=1e-12)


@pytest.mark.parametrize("shift", [1.15, 0.5, 2.3])
def test_flux_table_timestep_and_percent_follow_the_exponential_time_shift(shift: float):
    ms = ModelSampling.from_comfy("flux", "const", shift=shift)
    t = np.arange(1, 10001) / 10000
    expected = math.exp(shift) / (math.exp(shift) + (1 / t - 1))  # Flux: e^μ / (e^μ + (1/t − 1)^1)
    np.testing.assert_allclose(ms.sigmas.numpy(), expected, rtol=2e-6)
    assert len(ms.sigmas) == 10000 and float(ms.sigma_max) == 1.0
    sigma = torch.tensor(0.4)
    assert torch.equal(ms.timestep(sigma), sigma)  # the model gets σ itself
    assert ms.percent_to_sigma(0.3) == pytest.approx(math.exp(shift) / (math.exp(shift) + 1 / 0.7 - 1), rel=1e-12)


def test_comfyui_model_classes_and_the_flux_node_shift():
    sd3 = ModelSampling.for_comfy_model("SD3")
    assert (sd3.kind, sd3.settings) == ("discrete_flow", {"shift": 3.0, "multiplier": 1000.0})
    dev = ModelSampling.for_comfy_model("Flux")
    assert (dev.kind, dev.settings) == ("flux", {"shift": 1.15})
    schnell = ModelSampling.for_comfy_model("FluxSchnell")  # not ModelSamplingFlux: discrete flow, σ as timestep
    assert (schnell.kind, schnell.settings) == ("discrete_flow", {"shift": 1.0, "multiplier": 1.0})
    assert float(schnell.timestep(torch.tensor(0.25))) == 0.25
    v = ModelSampling.for_comfy_model("SDXL", prediction="v_prediction", zsnr=True)
    assert (v.kind, v.prediction, v.settings["zsnr"]) == ("discrete", "v_prediction", True)
    assert set(COMFY_MODELS) >= {"SD15", "SDXL", "SD3", "Flux", "FluxInpaint", "FluxSchnell"}
    # ComfyUI's ModelSamplingFlux node: base_shift at 256² pixels, max_shift at 1024², linear in area
    assert flux_shift(1.15, 0.5, 1024, 1024) == pytest.approx(1.15)
    assert flux_shift(1.15, 0.5, 256, 256) == pytest.approx(0.5)
    assert flux_shift(1.15, 0.5, 512, 512) == pytest.approx(0.5 + 0.65 * (1024 - 256) / (4096 - 256))


def test_from_comfy_refuses_what_comfyui_does_not_build():
    with pytest.raises(ValueError, match="supported: discrete, discrete_flow, flux"):
        ModelSampling.from_comfy("edm", "eps")
    with pytest.raises(ValueError, match="does not build 'discrete' with 'const'"):
        ModelSampling.from_comfy("discrete", "const")
    with pytest.raises(ValueError, match="does not build 'flux' with 'eps'"):
        ModelSampling.from_comfy("flux", "eps")
    with pytest.raises(ValueError, match="unknown discrete_flow setting"):
        ModelSampling.from_comfy("discrete_flow", "const", shift=3.0, zsnr=True)
    with pytest.raises(ValueError, match="unknown prediction"):
        ModelSampling.from_comfy("discrete", "x0")


def test_scheduler_configs_map_to_the_kind_comfyui_uses():
    sd = ModelSampling.from_scheduler_config({"beta_schedule": "scaled_linear"})
    assert (sd.kind, sd.prediction, sd.settings["beta_schedule"]) == ("discrete", "eps", "linear")
    assert torch.equal(sd.sigmas, ModelSampling.from_comfy("discrete", "eps").sigmas)
    vz = ModelSampling.from_scheduler_config(
        {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    )
    assert torch.equal(vz.sigmas, ModelSampling.from_comfy("discrete", "v_prediction", zsnr=True).sigmas)
    assert vz.prediction == "v_prediction"
    # an SDXL v-prediction finetune whose config says epsilon: the caller's overrides win
    override = ModelSampling.from_scheduler_config({}, prediction="v_prediction", zsnr=True)
    assert torch.equal(override.sigmas, vz.sigmas) and override.prediction == "v_prediction"
    sd3 = ModelSampling.from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert torch.equal(sd3.sigmas, ModelSampling.for_comfy_model("SD3").sigmas) and sd3.kind == "discrete_flow"
    dev_config = {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
        "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True,
    }  # fmt: skip
    dev = ModelSampling.from_scheduler_config(dev_config)
    assert torch.equal(dev.sigmas, ModelSampling.for_comfy_model("Flux").sigmas) and dev.kind == "flux"
    schnell_config = {**dev_config, "shift": 1.0, "use_dynamic_shifting": False}
    schnell = ModelSampling.from_scheduler_config(schnell_config, multiplier=1.0)
    assert torch.equal(schnell.sigmas, ModelSampling.for_comfy_model("FluxSchnell").sigmas)
    assert schnell.settings == {"shift": 1.0, "multiplier": 1.0}
    with pytest.raises(ValueError, match="shift_terminal"):
        ModelSampling.from_scheduler_config({**dev_config, "shift_terminal": 0.1})
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        ModelSampling.from_scheduler_config({"prediction_type": "sample"})


def _pair(shape=(2, 4, 3, 3), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_each_prediction_recovers_x0_from_its_model_output():
    x0, noise = _pair()
    sigma = torch.tensor([0.8, 0.25])  # per-sample sigmas broadcast over the batch
    s = sigma.reshape(2, 1, 1, 1)
    # eps: x = x0 + σ·ε (VE view), the model predicts ε
    eps = ModelSampling.from_comfy("discrete", "eps")
    torch.testing.assert_close(eps.calculate_denoised(sigma, noise, x0 + s * noise), x0)
    torch.testing.assert_close(eps.calculate_input(sigma, x0), x0 / (s**2 + 1).sqrt())
    # v: in the VP view z = α·x0 + σ_t·ε with α = 1/√(1+σ²), σ_t = σ/√(1+σ²), v = α·ε − σ_t·x0
    v = ModelSampling.from_comfy("discrete", "v_prediction")
    alpha, sigma_t = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    torch.testing.assert_close(v.calculate_denoised(sigma, alpha * noise - sigma_t * x0, x0 + s * noise), x0)
    # const: x = (1 − σ)·x0 + σ·ε, the model predicts the velocity ε − x0 and sees x itself
    for flow in (ModelSampling.for_comfy_model("SD3"), ModelSampling.for_comfy_model("Flux")):
        x = (1 - s) * x0 + s * noise
        torch.testing.assert_close(flow.calculate_denoised(sigma, noise - x0, x), x0)
        assert flow.calculate_input(sigma, x) is x


def test_noise_scaling_and_its_inverse_per_prediction():
    latent, noise = _pair(seed=3)
    flow = ModelSampling.for_comfy_model("SD3")
    for value in (0.0, 0.3, 0.999):
        sigma = torch.tensor(value)
        noised = flow.noise_scaling(sigma, noise, latent, max_denoise=True)  # max_denoise: no effect on CONST
        torch.testing.assert_close(noised, value * noise + (1 - value) * latent)
        # no noise: the start latent scaled by 1 − σ, which the end of a run divides out again
        round_trip = flow.inverse_noise_scaling(sigma, flow.noise_scaling(sigma, torch.zeros_like(noise), latent))
        torch.testing.assert_close(round_trip, latent)
    assert torch.equal(flow.noise_scaling(torch.tensor(1.0), noise, latent), noise)
    assert torch.equal(flow.inverse_noise_scaling(torch.tensor(0.0), latent), latent)
    eps = ModelSampling.from_comfy("discrete", "v_prediction")
    sigma = torch.tensor(2.0)
    torch.testing.assert_close(eps.noise_scaling(sigma, noise, latent), latent + 2 * noise)
    torch.testing.assert_close(eps.noise_scaling(sigma, noise, latent, max_denoise=True), latent + 5**0.5 * noise)
    assert eps.inverse_noise_scaling(sigma, latent) is latent


def test_describe_is_json_able_and_names_the_settings():
    import json

    described = ModelSampling.for_comfy_model("SD3").describe()
    assert described["kind"] == "discrete_flow" and described["prediction"] == "const"
    assert described["shift"] == 3.0 and described["multiplier"] == 1000.0 and described["sigma_max"] == 1.0
    json.dumps(ModelSampling.from_scheduler_config({}).describe())


def test_schedules_on_the_flow_tables_follow_comfyuis_grids():
    from deployments.sampling.schedulers import calculate_sigmas

    sd3, flux = ModelSampling.for_comfy_model("SD3"), ModelSampling.for_comfy_model("Flux")

    def shift3(t: np.ndarray) -> np.ndarray:
        return 3 * t / (1 + 2 * t)

    # normal: model timesteps σ·1000 spaced linearly from σ_max to σ_min, σ by the shift formula, then 0
    low = float(sd3.sigma_min)
    timesteps = np.linspace(1000.0, low * 1000, 6)
    expected = list(shift3(timesteps / 1000)) + [0.0]
    np.testing.assert_allclose(calculate_sigmas(sd3, "normal", 6).numpy(), expected, rtol=1e-5)
    # sgm_uniform: T + 1 points, the last dropped
    timesteps = np.linspace(1000.0, low * 1000, 7)[:-1]
    np.testing.assert_allclose(calculate_sigmas(sd3, "sgm_uniform", 6).numpy(), list(shift3(timesteps / 1000)) + [0],
                               rtol=1e-5)  # fmt: skip
    # flux: the model timestep is σ; simple strides through the 10,000-entry table
    t = np.arange(1, 10001) / 10000
    table = math.exp(1.15) / (math.exp(1.15) + 1 / t - 1)
    expected = [table[-(1 + int(i * 10000 / 7))] for i in range(7)] + [0.0]
    np.testing.assert_allclose(calculate_sigmas(flux, "simple", 7).numpy(), expected, rtol=2e-6)
    timesteps = np.linspace(1.0, float(flux.sigma_min), 5)
    expected = list(math.exp(1.15) / (math.exp(1.15) + 1 / timesteps - 1)) + [0.0]
    np.testing.assert_allclose(calculate_sigmas(flux, "normal", 5).numpy(), expected, rtol=1e-5)
    # linear_quadratic scales by sigma_max = 1
    assert calculate_sigmas(flux, "linear_quadratic", 4)[0] == 1.0
