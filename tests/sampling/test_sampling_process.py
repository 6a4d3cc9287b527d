"""The crop process contract: UNet requests, cfg shortcut, masks, differential diffusion, noise."""

from __future__ import annotations

import pytest
import torch
from sampling_helpers import ToyDenoiser, sd15

from deployments.sampling import (
    UNetRequest,
    UNetResponse,
    UnsupportedSamplerError,
    crop_process,
    sample,
    sigmas_for,
    validate,
)
from deployments.sampling.noise import gaussian_noise, initial_noise

SHAPE = (1, 4, 8, 8)


class ToyEpsUNet:
    """A raw eps-predicting 'UNet' on (x_in, timestep): the toy denoiser seen through c_in/c_out."""

    def __init__(self, seed: int = 3) -> None:
        self.toy = ToyDenoiser(SHAPE, seed)
        self.ms = sd15()
        self.requests: list[UNetRequest] = []

    def __call__(self, request: UNetRequest) -> UNetResponse:
        self.requests.append(request)
        sigma = self.ms.sigma(torch.tensor(request.timestep))
        x = request.x_in * (sigma**2 + 1) ** 0.5
        cond = (x - self.toy.predict(x, sigma, self.toy.target)) / sigma
        uncond = (x - self.toy.predict(x, sigma, self.toy.uncond_target)) / sigma if request.uncond else None
        return UNetResponse(cond=cond, uncond=uncond)


def run(process, unet) -> torch.Tensor:
    try:
        request = next(process)
        while True:
            request = process.send(unet(request))
    except StopIteration as done:
        return done.value


def settings(**overrides):
    base = dict(sampler_name="euler_ancestral", scheduler="karras", steps=6, denoise=0.6, cfg=6.0, seed=11,
                latent_image=torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)),
                noise_mask=None, differential=False)  # fmt: skip
    base.update(overrides)
    return base


def test_requests_carry_c_in_whole_timesteps_and_cfg_flag():
    ms = sd15()
    unet = ToyEpsUNet()
    latent = run(crop_process(ms, **settings(sampler_name="euler", cfg=1.0)), unet)
    sigmas = sigmas_for(ms, "euler", "karras", 6, 0.6)
    assert [r.sigma for r in unet.requests] == pytest.approx(sigmas[:-1].tolist())
    assert all(r.timestep == int(ms.timestep(torch.tensor(r.sigma))) for r in unet.requests)
    assert all(r.timestep == float(int(r.timestep)) for r in unet.requests)
    assert not any(r.uncond for r in unet.requests)  # cfg = 1: no negative evaluation
    first = unet.requests[0]
    assert first.x_in.shape == SHAPE
    assert torch.isfinite(latent).all()


def test_crop_process_equals_standalone_sample_with_the_same_model():
    ms = sd15()
    unet = ToyEpsUNet()
    via_unet = run(crop_process(ms, **settings(sampler_name="heun")), unet)

    def denoiser(x, sigma, need_uncond):
        request = UNetRequest(ms.calculate_input(sigma, x), float(ms.timestep(sigma)), float(sigma), need_uncond)
        response = unet(request)
        cond = ms.calculate_denoised(sigma, response.cond, x)
        return cond, (ms.calculate_denoised(sigma, response.uncond, x) if need_uncond else None)

    standalone = sample(denoiser, ms, **settings(sampler_name="heun"))
    torch.testing.assert_close(via_unet, standalone, rtol=0, atol=0)


def test_interleaved_processes_equal_each_alone():
    ms = sd15()
    configs = [
        settings(seed=1),
        settings(seed=2, sampler_name="heun", steps=4),
        settings(seed=3, noise_mask=torch.rand(1, 1, 8, 8), differential=True),
    ]
    alone = [run(crop_process(ms, **config), ToyEpsUNet()) for config in configs]
    unet = ToyEpsUNet()
    processes = [crop_process(ms, **config) for config in configs]
    pending = {i: next(p) for i, p in enumerate(processes)}
    results = {}
    while pending:  # one "engine step": every active crop advances by one evaluation
        for i in list(pending):
            try:
                pending[i] = processes[i].send(unet(pending[i]))
            except StopIteration as done:
                results[i] = done.value
                del pending[i]
    for i, expected in enumerate(alone):
        torch.testing.assert_close(results[i], expected, rtol=0, atol=0)
    assert not torch.allclose(results[0], results[2])


def test_seed_changes_the_result_and_same_seed_repeats():
    ms = sd15()
    a = run(crop_process(ms, **settings(seed=5)), ToyEpsUNet())
    b = run(crop_process(ms, **settings(seed=5)), ToyEpsUNet())
    c = run(crop_process(ms, **settings(seed=6)), ToyEpsUNet())
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_zero_mask_returns_the_original_latent_and_soft_mask_blends():
    ms = sd15()
    base = settings(sampler_name="euler")
    zero = run(crop_process(ms, **{**base, "noise_mask": torch.zeros(1, 1, 8, 8)}), ToyEpsUNet())
    torch.testing.assert_close(zero, base["latent_image"], rtol=0, atol=1e-5)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1.0
    masked = run(crop_process(ms, **{**base, "noise_mask": mask}), ToyEpsUNet())
    free = run(crop_process(ms, **base), ToyEpsUNet())
    outside = mask.expand(SHAPE) == 0
    torch.testing.assert_close(masked[outside], base["latent_image"][outside], rtol=0, atol=1e-5)
    assert (masked[~outside] - base["latent_image"][~outside]).abs().max() > 1e-2
    # inside, the mask changes the result too: every model call sees the re-noised surroundings
    assert not torch.allclose(masked[~outside], free[~outside])


def test_mask_is_applied_at_every_model_call_including_midpoints():
    """Heun's second evaluation sees x blended with the original noised to that call's sigma."""
    ms = sd15()
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1.0
    unet = ToyEpsUNet()
    config = settings(sampler_name="heun", noise_mask=mask, cfg=1.0)
    run(crop_process(ms, **config), unet)
    noise = initial_noise(SHAPE, config["seed"])
    latent = config["latent_image"]
    outside = mask.expand(SHAPE) == 0
    for request in unet.requests:
        sigma = torch.tensor(request.sigma)
        expected = ms.calculate_input(sigma, latent + noise * sigma)
        torch.testing.assert_close(request.x_in[outside], expected[outside], rtol=1e-6, atol=1e-6)


def test_differential_diffusion_threshold_follows_the_timesteps():
    """A cell with mask m is denoised from the call whose normalised timestep is ≤ m on."""
    ms = sd15()
    mask = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8)
    unet = ToyEpsUNet()
    config = settings(
        sampler_name="euler", noise_mask=mask, differential=True, cfg=1.0, denoise=1.0, scheduler="normal"
    )
    final = run(crop_process(ms, **config), unet)
    sigmas = sigmas_for(ms, "euler", "normal", 6, 1.0)
    noise = initial_noise(SHAPE, config["seed"])
    latent = config["latent_image"]
    t_from = int(ms.timestep(sigmas[0]))
    for request in unet.requests[1:]:
        sigma = torch.tensor(request.sigma)
        threshold = (request.timestep - 0) / (t_from - 0)
        held = (mask < threshold).expand(SHAPE)
        expected = ms.calculate_input(sigma, latent + noise * sigma)
        torch.testing.assert_close(request.x_in[held], expected[held], rtol=1e-6, atol=1e-6)
    # the last call is at sigma_min (timestep 0): threshold 0 lets every cell, mask 0 included, take it
    assert unet.requests[-1].timestep == 0.0
    assert (final - latent)[mask.expand(SHAPE) == 0].abs().max() > 1e-3


def test_first_ancestral_draw_on_cpu_is_not_the_initial_noise():
    """ComfyUI issue #9819 / PR #11528: on CPU the ancestral generator is seeded with seed + 1."""
    x = torch.zeros(SHAPE)
    draw = gaussian_noise(x, 42)(torch.tensor(1.0), torch.tensor(0.5))
    assert not torch.equal(draw, initial_noise(SHAPE, 42))
    assert torch.equal(draw, torch.randn(SHAPE, generator=torch.Generator().manual_seed(43)))
    # 2**64 − 1 + 1 wraps to 0 instead of overflowing
    assert torch.equal(
        gaussian_noise(x, 2**64 - 1)(1, 0), torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    )


def test_validate_refuses_unknown_and_bad_values_before_model_work():
    with pytest.raises(UnsupportedSamplerError, match="supported: euler"):
        validate("not_a_sampler", "karras", 10, 1.0)
    with pytest.raises(UnsupportedSamplerError, match="scheduler"):
        validate("euler", "AYS SDXL", 10, 1.0)
    for steps, denoise in [(0, 1.0), (10, 0.0), (10, 1.5), (10, float("nan"))]:
        with pytest.raises(UnsupportedSamplerError):
            validate("euler", "karras", steps, denoise)
    with pytest.raises(UnsupportedSamplerError, match="kl_optimal"):
        validate("euler", "kl_optimal", 1, 1.0)
    with pytest.raises(UnsupportedSamplerError):
        crop_process(sd15(), **settings(sampler_name="nope"))  # raised at the call, not at next()


def test_inpaint_concat_follows_comfyui_concat_cond():
    from deployments.sampling import inpaint_concat

    latent = torch.randn(SHAPE)
    # no mask: ones and the grey-image latent
    blank = inpaint_concat(latent)
    assert blank.shape == (1, 5, 8, 8)
    assert torch.equal(blank[:, :1], torch.ones(1, 1, 8, 8))
    assert blank[0, 1:, 0, 0].tolist() == pytest.approx([0.8223, -0.6876, 0.6364, 0.1380])
    # noise mask only: round(mask) and the original latent
    mask = torch.tensor([0.2, 0.49, 0.51, 1.0]).repeat(16).reshape(1, 1, 8, 8)
    fallback = inpaint_concat(latent, mask)
    assert torch.equal(fallback[:, :1], mask.round())
    assert torch.equal(fallback[:, 1:], latent)
    # InpaintModelConditioning: its own mask at pixel size, bilinear to the latent grid, rounded
    pixel_mask = torch.zeros(1, 1, 64, 64)
    pixel_mask[..., :, :28] = 1.0
    masked_latent = torch.randn(SHAPE)
    concat = inpaint_concat(latent, mask, concat_mask=pixel_mask, concat_latent=masked_latent)
    assert torch.equal(concat[:, 1:], masked_latent)
    # cell 3 samples pixel 27.5 (bilinear, no antialias): 0.5, which torch.round takes to 0 (half to even)
    assert concat[0, 0, 0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_a_malformed_unet_response_fails_that_crop_with_a_clear_error():
    process = crop_process(sd15(), **settings(cfg=1.0))
    request = next(process)
    with pytest.raises(ValueError, match="does not match its input"):
        process.send(UNetResponse(cond=torch.zeros(1, 4, 4, 4)))
    process = crop_process(sd15(), **settings(cfg=7.0))
    request = next(process)
    assert request.uncond
    with pytest.raises(ValueError, match="uncond"):
        process.send(UNetResponse(cond=torch.zeros_like(request.x_in)))


def test_docs_list_every_sampler_and_scheduler():
    from pathlib import Path

    from deployments.sampling import SAMPLER_NAMES, SCHEDULER_NAMES

    text = (Path(__file__).resolve().parents[2] / "docs" / "samplers.md").read_text()
    for name in (*SAMPLER_NAMES, *SCHEDULER_NAMES):
        assert f"| `{name}` |" in text, name
