"""The diffusion inpainter on the tiny random-weight SD models (CPU, offline).

Random weights make noise, not faces: these tests check loading, shapes, determinism and what
the inpainter feeds the sampler and the UNet (steps, cycles, the noise mask's path to the latent
grid, an inpainting UNet's extra channels, 8-bit truncation), not quality. Batch independence
across crops with different settings and join times is in ``test_engine_batching.py``; the
samplers' own arithmetic is tested in ``tests/sampling``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deployments.inpainter as inpainter_module
from deployments.inpainter import Inpainter, RefineJob, SamplingSettings, UnsupportedSamplerError
from deployments.sampling import SAMPLER_NAMES, SCHEDULER_NAMES
from deployments.sampling.inpaint import BLANK_INPAINT_LATENT
from deployments.weights import CorruptWeightsError, WeightsNotFoundError

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

FAST = SamplingSettings(steps=4, denoise=0.5, cfg=7.0)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="module")
def inpainter(tiny_sd: dict, lora_dir: Path) -> Inpainter:
    return Inpainter(tiny_sd["pipeline"], device="cpu", lora_dir=str(lora_dir), max_batch_size=8)


@pytest.fixture(scope="module")
def inpaint_inpainter(tiny_sd: dict) -> Inpainter:
    return Inpainter(tiny_sd["inpaint_pipeline"], device="cpu")


@pytest.fixture(scope="module")
def sdxl_inpainter(tiny_sd: dict) -> Inpainter:
    return Inpainter(tiny_sd["sdxl_pipeline"], device="cpu")


class DecodedLatents:
    """Captures what the inpainter decodes: final latents and float pixels, per batch."""

    def __init__(self, inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        original = inpainter._decode

        def decode(latents: torch.Tensor) -> torch.Tensor:
            pixels = original(latents)
            self.batches.append((latents.clone(), pixels.clone()))
            return pixels

        monkeypatch.setattr(inpainter, "_decode", decode)


def crop(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random image (a real-ish crop: gradients plus noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def job(image: np.ndarray, seed: int = 1, mask: np.ndarray | None = None, **kwargs: object) -> RefineJob:
    fields = {"positive": ("a photo of a face",), "negative": ("blurry",), "seed": seed, **kwargs}
    return RefineJob(image=image, noise_mask=mask, **fields)  # type: ignore[arg-type]


def box_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.float32)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1.0
    return mask


# ------------------------------------------------------------------ tiny models and loading


def test_tiny_tokenizer_is_the_real_clip_bpe(tiny_sd: dict) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd["tokenizer"])
    assert len(tokenizer) == 49408
    # Token ids of openai/clip-vit-large-patch14 for this sentence.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.tokenize("A Photo of a CAT, highly detailed!") == [
        "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", ",</w>", "highly</w>", "detailed</w>", "!</w>",
    ]  # fmt: skip
    assert tokenizer.decode(tokenizer("portrait, sharp focus").input_ids, skip_special_tokens=True).strip() == (
        "portrait , sharp focus"
    )


def test_folder_single_file_and_inpainting_variants_load(
    tiny_sd: dict, inpainter: Inpainter, inpaint_inpainter: Inpainter, sdxl_inpainter: Inpainter
) -> None:
    single = Inpainter(tiny_sd["single_file"], single_file_config=tiny_sd["single_file_config"], device="cpu")
    assert single.components.format == "single_file" and inpainter.components.format == "diffusers"
    for name in ("unet", "vae"):
        expected = getattr(inpainter.components, name).state_dict()
        loaded = getattr(single.components, name).state_dict()
        assert expected.keys() == loaded.keys()
        assert all(torch.equal(expected[key], loaded[key]) for key in expected), name
    encoder, loaded_encoder = inpainter.components.text_encoders[0], single.components.text_encoders[0]
    assert all(torch.equal(a, b) for a, b in zip(encoder.parameters(), loaded_encoder.parameters(), strict=True))
    assert not inpainter.components.is_inpaint and inpaint_inpainter.components.is_inpaint
    assert sdxl_inpainter.components.is_sdxl and len(sdxl_inpainter.components.text_encoders) == 2
    info = inpainter.info()
    json.dumps(info)
    assert info["unet_in_channels"] == 4 and info["vae_scale_factor"] == 8 and info["dtype"] == "float32"
    inpainter.check_health()


def test_single_file_loads_the_same_as_the_folder(tiny_sd: dict, inpainter: Inpainter) -> None:
    single = Inpainter(tiny_sd["single_file"], single_file_config=tiny_sd["single_file_config"], device="cpu")
    jobs = [job(crop(64, 64))]
    assert np.array_equal(single.refine(jobs, FAST)[0], inpainter.refine(jobs, FAST)[0])


def test_missing_weights_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        Inpainter(str(missing), device="cpu")
    with pytest.raises(WeightsNotFoundError, match="nobody/no-such-repo"):
        Inpainter("nobody/no-such-repo", device="cpu")


def test_corrupt_weights_name_the_path(tmp_path: Path, tiny_sd: dict) -> None:
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(CorruptWeightsError, match=str(garbage)):
        Inpainter(str(garbage), single_file_config=tiny_sd["single_file_config"], device="cpu")
    folder = tmp_path / "broken-folder"
    shutil.copytree(tiny_sd["pipeline"], folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptWeightsError, match=str(folder)):
        Inpainter(str(folder), device="cpu")


# ------------------------------------------------------------------ refine: shapes and determinism


def test_refines_crops_of_different_sizes_in_input_order(inpainter: Inpainter) -> None:
    sizes = [(70, 90), (64, 64), (33, 47), (70, 90)]
    jobs = [job(crop(h, w, seed=i), seed=i, mask=box_mask(h, w) if i % 2 else None) for i, (h, w) in enumerate(sizes)]
    calls_before = inpainter.engine.snapshot()["unet_calls"]
    results = inpainter.refine(jobs, FAST)
    assert [result.shape for result in results] == [(h, w, 3) for h, w in sizes]
    assert all(result.dtype == np.uint8 for result in results)
    # one UNet call per latent size and step: 72×96 (×2), 64×64, 40×48
    assert inpainter.engine.snapshot()["unet_calls"] - calls_before == 3 * FAST.steps


def test_seeds_reproduce_bit_for_bit_and_differ(inpainter: Inpainter) -> None:
    image = crop(70, 90)
    first = inpainter.refine([job(image, seed=7)], FAST)[0]
    again = inpainter.refine([job(image, seed=7)], FAST)[0]
    other = inpainter.refine([job(image, seed=8)], FAST)[0]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def replace_settings(settings: SamplingSettings, **changes: object) -> SamplingSettings:
    return settings.model_copy(update=changes)


class SamplerArguments:
    """Records what the inpainter hands the sampling package for each cycle."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        original = inpainter_module.crop_process

        def crop_process(model_sampling, **kwargs):  # noqa: ANN001, ANN202
            self.calls.append(kwargs)
            return original(model_sampling, **kwargs)

        monkeypatch.setattr(inpainter_module, "crop_process", crop_process)


class UnetInputs:
    """Captures every UNet input batch (latent + extra channels) and its timesteps."""

    def __init__(self, inpainter: Inpainter) -> None:
        self.samples: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.handle = inpainter.components.unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: object, args: tuple, kwargs: dict) -> None:
        self.samples.append(args[0].detach().clone())
        self.timesteps.append(args[1].detach().clone())

    def __enter__(self) -> UnetInputs:
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


# ------------------------------------------------------------------ ComfyUI sampling semantics


def test_steps_20_denoise_half_runs_20_unet_evaluations(inpainter: Inpainter) -> None:
    with UnetInputs(inpainter) as inputs:
        inpainter.refine([job(crop(64, 64))], SamplingSettings(steps=20, denoise=0.5))
    assert len(inputs.samples) == 20  # diffusers' strength would run 10
    assert all(sample.shape[0] == 2 for sample in inputs.samples), "cond + uncond rows at cfg 8"
    timesteps = [float(t[0]) for t in inputs.timesteps]
    assert timesteps == sorted(timesteps, reverse=True) and all(t == round(t) for t in timesteps), (
        "ComfyUI feeds the UNet whole, decreasing timesteps"
    )
    with UnetInputs(inpainter) as inputs:
        inpainter.refine([job(crop(64, 64))], SamplingSettings(steps=3, cfg=1.0))
    assert [sample.shape[0] for sample in inputs.samples] == [1, 1, 1], "cfg 1: no uncond row"


@pytest.mark.parametrize(("sampler_name", "expected"), [("heun", 2 * 5 - 1), ("dpm_2", 2 * 5 - 1), ("euler", 5)])
def test_evaluations_per_step_follow_the_sampler_order(inpainter: Inpainter, sampler_name: str, expected: int) -> None:
    """2nd-order samplers evaluate twice per step except the last (to sigma 0), as k-diffusion."""
    with UnetInputs(inpainter) as inputs:
        result = inpainter.refine_result(
            [job(crop(64, 64))], SamplingSettings(steps=5, denoise=0.4, sampler_name=sampler_name)
        )
    assert len(inputs.samples) == expected and result.unet_evaluations == [expected]


def test_cycles_resample_the_latent_with_the_next_seed(inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch) -> None:
    image = crop(64, 64)
    arguments = SamplerArguments(monkeypatch)
    with UnetInputs(inpainter) as inputs:
        two = inpainter.refine([job(image, seed=2**64 - 1)], replace_settings(FAST, cycle=2))[0]
    assert len(inputs.samples) == 2 * FAST.steps
    assert [call["seed"] for call in arguments.calls] == [2**64 - 1, 0], "seed + cycle, mod 2**64"
    assert not torch.equal(arguments.calls[1]["latent_image"], arguments.calls[0]["latent_image"]), (
        "cycle 1 starts from cycle 0's result"
    )
    one = inpainter.refine([job(image, seed=2**64 - 1)], FAST)[0]
    assert not np.array_equal(one, two)


def test_the_noise_mask_goes_from_crop_size_to_the_latent_grid_in_one_bilinear_step(
    inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ComfyUI resizes the crop-size mask to the latent in one step (not via the upscaled size)."""
    crop_mask = np.zeros((24, 24), np.float32)
    crop_mask[5:17, 9:20] = 1.0  # hard edges at positions that don't fall on the 8-px grid
    arguments = SamplerArguments(monkeypatch)
    inpainter.refine([job(crop(64, 64), mask=crop_mask)], replace_settings(FAST, noise_mask_feather=0))
    [call] = arguments.calls
    source = torch.from_numpy(crop_mask)[None, None]
    one_step = F.interpolate(source, size=(8, 8), mode="bilinear")
    two_steps = F.interpolate(F.interpolate(source, size=(64, 64), mode="bilinear"), size=(8, 8), mode="bilinear")
    torch.testing.assert_close(call["noise_mask"], one_step, rtol=0, atol=1e-6)
    assert float((one_step - two_steps).abs().max()) > 0.05, "the old two-step path is measurably different"
    assert call["differential"] is False

    arguments.calls.clear()
    inpainter.refine([job(crop(70, 90), mask=np.ones((30, 40), np.float32))], FAST)
    [call] = arguments.calls
    mask = call["noise_mask"][0, 0]
    assert mask.shape == (9, 12) and call["differential"] is True
    # cells whose centre is over the 70×90 image get the mask, those over the padding 0
    assert torch.all(mask[:9, :11] == 1.0) and torch.all(mask[:, 11] == 0.0)


class UnetCalls:
    """Every UNet call's input batch, timesteps and raw output (eps rows, as the UNet returns them)."""

    def __init__(self, inpainter: Inpainter) -> None:
        self.samples: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.handle = inpainter.components.unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: object, args: tuple, kwargs: dict, output: object) -> None:
        self.samples.append(args[0].detach().clone())
        self.timesteps.append(args[1].detach().clone())
        self.outputs.append((output[0] if isinstance(output, tuple) else output.sample).detach().float().clone())

    def __enter__(self) -> UnetCalls:
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


def radial_mask(size: int) -> np.ndarray:
    """1 in the centre falling to 0 before the corners: soft values and a mask-0 border."""
    y, x = np.mgrid[0:size, 0:size]
    distance = np.hypot(y - (size - 1) / 2, x - (size - 1) / 2) / (size / 2)
    return np.clip(1.4 - 1.4 * distance, 0.0, 1.0).astype(np.float32)


def replay_euler(
    inpainter: Inpainter, calls: UnetCalls, image: np.ndarray, mask: np.ndarray, settings: SamplingSettings, seed: int,
    *, every_call: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Euler with ComfyUI's masked sampling, written out from k-diffusion + ``KSamplerX0Inpaint``.

    Uses the UNet outputs the inpainter got and returns (final latent, the UNet inputs this rule
    expects at each call, the last call's step mask). ``every_call=False`` is the rule the
    inpainter used before: blend the latent at step starts, never replace the prediction.
    """
    from deployments.inpainter import _to_pixels
    from deployments.sampling import sigmas_for

    ms = inpainter.model_sampling
    with torch.inference_mode():
        original = inpainter._encode(_to_pixels(image)[None])
    latent_mask = F.interpolate(torch.from_numpy(mask)[None, None], size=original.shape[-2:], mode="bilinear")
    noise = torch.randn(original.shape, generator=torch.Generator().manual_seed(seed))  # prepare_noise
    sigmas = sigmas_for(ms, settings.sampler_name, settings.scheduler, settings.steps, settings.denoise)
    t_first, t_last = ms.timestep(sigmas[0]).float(), ms.timestep(torch.maximum(sigmas[-1], ms.sigma_min)).float()
    x = original + noise * sigmas[0]  # denoise < 1: noise · σ, no √(1 + σ²)
    expected_inputs, step_mask = [], latent_mask
    for i in range(len(sigmas) - 1):
        sigma, following = sigmas[i], sigmas[i + 1]
        if settings.noise_mask_feather > 0:  # differential diffusion: cells join once mask ≥ threshold
            threshold = (ms.timestep(sigma).float() - t_last) / (t_first - t_last)
            step_mask = (latent_mask >= threshold).float()
        blended = x * step_mask + (original + noise * sigma) * (1 - step_mask)
        expected_inputs.append(blended / (sigma**2 + 1) ** 0.5)
        eps = calls.outputs[i]
        cond, uncond = blended - eps[:1] * sigma, blended - eps[1:2] * sigma
        denoised = uncond + (cond - uncond) * settings.cfg
        if every_call:
            denoised = denoised * step_mask + original * (1 - step_mask)  # KSamplerX0Inpaint
        else:
            x = blended
        x = x + (x - denoised) / sigma * (following - sigma)
    return x, expected_inputs, step_mask


def test_masked_sampling_follows_ksamplerx0inpaint_at_every_model_call(
    inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ComfyUI's rule, checked by value against the real UNet's own outputs: at every model call the
    cells outside that step's mask are the original latent re-noised to σ, the prediction there is
    replaced by the original latent, and at the last step (threshold 0 under differential
    diffusion) mask-0 cells take the prediction."""
    image, mask, seed = crop(64, 64, seed=3), radial_mask(32), 11
    settings = SamplingSettings(steps=6, denoise=0.6, cfg=3.0, noise_mask_feather=20)
    decoded = DecodedLatents(inpainter, monkeypatch)
    with UnetCalls(inpainter) as calls:
        inpainter.refine([job(image, seed=seed, mask=mask)], settings)
    [(final, _)] = decoded.batches
    expected, expected_inputs, last_mask = replay_euler(inpainter, calls, image, mask, settings, seed)
    assert len(calls.samples) == settings.steps
    for call, (sample, wanted) in enumerate(zip(calls.samples, expected_inputs, strict=True)):
        torch.testing.assert_close(sample[:1], wanted, rtol=1e-5, atol=1e-5, msg=f"cond row of call {call}")
        torch.testing.assert_close(sample[1:], wanted, rtol=1e-5, atol=1e-5, msg=f"uncond row of call {call}")
    torch.testing.assert_close(final, expected, rtol=1e-4, atol=1e-4)
    # the test can tell the rules apart: the old one ends elsewhere on the same UNet outputs
    old_rule, _, _ = replay_euler(inpainter, calls, image, mask, settings, seed, every_call=False)
    assert float((old_rule - final).abs().max()) > 1e-2

    latent_mask = F.interpolate(torch.from_numpy(mask)[None, None], size=(8, 8), mode="bilinear")
    zero_cells = (latent_mask == 0).expand_as(final)
    assert zero_cells.any() and torch.all(last_mask == 1), "the last step includes every cell"
    with torch.inference_mode():
        from deployments.inpainter import _to_pixels

        original = inpainter._encode(_to_pixels(image)[None])
    assert float((final - original)[zero_cells].abs().max()) > 1e-2, "mask-0 cells took the last prediction"

    # without differential diffusion the mask-0 cells keep the original latent to the end
    decoded.batches.clear()
    plain = replace_settings(settings, noise_mask_feather=0)
    with UnetCalls(inpainter) as calls:
        inpainter.refine([job(image, seed=seed, mask=mask)], plain)
    [(final, _)] = decoded.batches
    torch.testing.assert_close(final, replay_euler(inpainter, calls, image, mask, plain, seed)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final[zero_cells], original[zero_cells], rtol=0, atol=1e-5)


def test_a_crop_without_a_mask_is_unmasked_unless_padded(inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch) -> None:
    arguments = SamplerArguments(monkeypatch)
    inpainter.refine([job(crop(64, 64)), job(crop(66, 64))], FAST)
    unpadded, padded = arguments.calls
    assert unpadded["noise_mask"] is None
    expected = torch.ones((1, 1, 9, 8))
    expected[..., 8, :] = 0.0  # row 8's centre (68 px) is over the padding
    assert torch.equal(padded["noise_mask"], expected) and padded["differential"] is False


def test_decoded_crops_are_truncated_to_8_bits(inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch) -> None:
    from deployments.inpainter import _to_uint8

    pixels = torch.tensor([0.0, 0.5 / 255, 0.999, 1.0, 254.9 / 255]).reshape(1, 1, 5).expand(3, 1, 5)
    assert _to_uint8(pixels)[0, :, 0].tolist() == [0, 0, 254, 255, 254]
    decoded = DecodedLatents(inpainter, monkeypatch)
    result = inpainter.refine([job(crop(64, 64))], FAST)[0]
    [(_, floats)] = decoded.batches
    expected = np.clip(255.0 * floats[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
    assert np.array_equal(result, expected), "ComfyUI's clip(255·x).astype(uint8)"
    rounded = np.clip(np.round(255.0 * floats[0].permute(1, 2, 0).numpy()), 0, 255).astype(np.uint8)
    assert not np.array_equal(result, rounded)


def test_inpainting_checkpoint_with_inpaint_model(inpaint_inpainter: Inpainter) -> None:
    """InpaintModelConditioning: round(mask) and the latent of the image greyed where round(mask) = 1."""
    mask = box_mask(64, 64)
    image = crop(64, 64)
    with UnetInputs(inpaint_inpainter) as inputs:
        conditioned = inpaint_inpainter.refine([job(image, mask=mask)], replace_settings(FAST, inpaint_model=True))[0]
    extra = inputs.samples[0][:, 4:]
    assert extra.shape[1] == 5
    expected_mask = torch.round(F.interpolate(torch.from_numpy(mask)[None, None], size=(8, 8), mode="bilinear"))
    assert torch.equal(extra[:1, :1], expected_mask)
    with torch.inference_mode():
        from deployments.inpainter import _to_pixels

        pixels = _to_pixels(image)[None]
        greyed = inpaint_inpainter._encode(pixels * (1 - torch.from_numpy(mask)[None, None]))
        original = inpaint_inpainter._encode(pixels)
    torch.testing.assert_close(extra[:1, 1:], greyed, rtol=0, atol=1e-5)
    assert not torch.allclose(extra[:1, 1:], original, atol=1e-2)
    plain = inpaint_inpainter.refine([job(image, mask=mask)], FAST)[0]
    assert not np.array_equal(plain, conditioned)


def test_inpainting_checkpoint_without_inpaint_model_gets_comfyuis_concat_conditioning(
    inpaint_inpainter: Inpainter,
) -> None:
    """concat_cond: with a noise mask, round(mask) and the cycle's input latent; without, ones and grey."""
    mask = box_mask(64, 64) * 0.7  # round(0.7) = 1 inside, 0 outside
    image = crop(64, 64)
    settings = replace_settings(FAST, noise_mask_feather=0, cycle=2)
    with UnetInputs(inpaint_inpainter) as inputs:
        inpaint_inpainter.refine([job(image, mask=mask)], settings)
    with torch.inference_mode():
        from deployments.inpainter import _to_pixels

        original = inpaint_inpainter._encode(_to_pixels(image)[None])
    first, last_of_cycle_0, first_of_cycle_1 = inputs.samples[0], inputs.samples[FAST.steps - 1], inputs.samples[-1]
    expected_mask = torch.round(F.interpolate(torch.from_numpy(mask)[None, None], size=(8, 8), mode="bilinear"))
    assert torch.equal(first[:1, 4:5], expected_mask) and torch.equal(first[1:, 4:5], expected_mask), "cond and uncond"
    torch.testing.assert_close(first[:1, 5:], original, rtol=0, atol=1e-6)
    assert torch.equal(last_of_cycle_0[:, 5:], first[:, 5:])
    assert not torch.allclose(first_of_cycle_1[:1, 5:], original, atol=1e-3), "cycle 1: its own input latent"

    with UnetInputs(inpaint_inpainter) as inputs:
        inpaint_inpainter.refine([job(image)], FAST)
    extra = inputs.samples[0][:1, 4:]
    assert torch.equal(extra[:, :1], torch.ones((1, 1, 8, 8)))
    assert torch.allclose(extra[0, 1:, 0, 0], torch.tensor(BLANK_INPAINT_LATENT))


def test_inpaint_model_on_a_4_channel_unet_is_rejected(inpainter: Inpainter) -> None:
    with pytest.raises(ValueError, match="9-channel"):
        inpainter.refine([job(crop(64, 64), mask=box_mask(64, 64))], replace_settings(FAST, inpaint_model=True))


def test_sdxl_conditioning(sdxl_inpainter: Inpainter) -> None:
    jobs = [job(crop(70, 90), mask=box_mask(70, 90)), job(crop(64, 64), positive=("a", "b BREAK c"))]
    with UnetInputs(sdxl_inpainter) as inputs:
        results = sdxl_inpainter.refine(jobs, FAST)
    assert [r.shape for r in results] == [(70, 90, 3), (64, 64, 3)]
    assert sorted(sample.shape[0] for sample in inputs.samples[:2]) == [2, 2], "one call per latent size"
    assert all(result.std() > 0 for result in results)


# ------------------------------------------------------------------ prompts


def test_prompt_chunks_are_encoded_separately_and_concatenated(inpainter: Inpainter) -> None:
    with torch.inference_mode():
        one, _ = inpainter._encode_prompt(("a photo of a face",))
        two, _ = inpainter._encode_prompt(("a photo of a face", "smiling"))
        long, _ = inpainter._encode_prompt((" ".join(["face"] * 100),))
        empty, _ = inpainter._encode_prompt(("",))
    assert one.shape[1] == 77 and two.shape[1] == 154 and long.shape[1] == 154 and empty.shape[1] == 77
    assert torch.equal(two[:, :77], one)  # each chunk on its own


def test_positive_and_negative_of_different_lengths_sample(inpainter: Inpainter) -> None:
    jobs = [
        job(crop(64, 64), positive=("a", "b", "c"), negative=("x", "y")),  # 3 and 2 windows → 6
        job(crop(64, 64), positive=(), negative=()),
    ]
    results = inpainter.refine(jobs, FAST)
    assert len(results) == 2


# ------------------------------------------------------------------ samplers and schedulers


def test_every_sampler_with_the_real_unet_in_one_shared_run(inpainter: Inpainter) -> None:
    """Every sampler (schedulers in turn) on the tiny UNet: finite, not constant, seed-dependent, and
    the same when all of them share one engine run as alone. Every sampler × scheduler pair is
    checked on a toy denoiser in ``tests/sampling/test_sampling_pairs.py``."""
    image = crop(40, 48)
    samplers = inpainter.supported_samplers()
    pairs = [(sampler, SCHEDULER_NAMES[index % len(SCHEDULER_NAMES)]) for index, sampler in enumerate(samplers)]
    assert inpainter.supported_samplers() == list(SAMPLER_NAMES)
    assert {"normal", "karras", "simple"} <= set(SCHEDULER_NAMES)
    jobs = [
        job(image, seed=index, mask=box_mask(40, 48), settings=SamplingSettings(
            steps=3, denoise=0.6, cfg=5.0, sampler_name=sampler, scheduler=scheduler
        ))
        for index, (sampler, scheduler) in enumerate(pairs)
    ]  # fmt: skip
    inpainter.engine.configure(max_batch_size=len(jobs))
    try:
        shared = inpainter.refine(jobs)
    finally:
        inpainter.engine.configure(max_batch_size=8)
    unmasked = replace_settings(FAST, noise_mask_feather=0)
    round_trip = inpainter.refine([job(image, mask=np.zeros((40, 48), np.float32))], unmasked)[0]
    for (sampler, scheduler), shared_result, single in zip(pairs, shared, jobs, strict=True):
        alone = inpainter.refine([single])[0]
        assert int(np.abs(alone.astype(int) - shared_result.astype(int)).max()) <= 1, (sampler, scheduler)
        assert alone.std() > 1.0 and not np.array_equal(alone, round_trip), (sampler, scheduler)
        other_seed = job(image, seed=single.seed + 1000, mask=box_mask(40, 48), settings=single.settings)
        reseeded = inpainter.refine([other_seed])[0]
        assert not np.array_equal(reseeded, alone), (sampler, scheduler)


def test_unsupported_names_list_the_supported_ones(inpainter: Inpainter) -> None:
    with pytest.raises(UnsupportedSamplerError, match="supported: euler, "):
        inpainter.validate_settings(SamplingSettings(sampler_name="no_such_sampler"))
    with pytest.raises(UnsupportedSamplerError, match="supported: simple, "):
        inpainter.validate_settings(SamplingSettings(scheduler="no_such_schedule"))
    with pytest.raises(UnsupportedSamplerError, match="job 1|supported"):
        inpainter.refine([job(crop(64, 64)), job(crop(64, 64), settings=SamplingSettings(sampler_name="nope"))], FAST)
    assert inpainter.supported_samplers() == list(SAMPLER_NAMES)


# ------------------------------------------------------------------ LoRA


def write_kohya_lora(path: Path, inpainter: Inpainter) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A kohya-format LoRA on one attention projection, one resnet conv (by its LDM name) and CLIP."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    layers = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": ((4, 64), (64, 4)),
        "lora_unet_input_blocks_1_0_in_layers_2": ((4, 32, 3, 3), (32, 4, 1, 1)),  # down_blocks.0.resnets.0.conv1
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((4, 32), (32, 4)),
    }
    state, expected = {}, {}
    for name, (down_shape, up_shape) in layers.items():
        down, up = torch.randn(down_shape, generator=generator), torch.randn(up_shape, generator=generator)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}
        expected[name] = (down, up, 2.0 / 4)
    save_file(state, str(path))
    return expected


def test_lora_is_merged_for_its_jobs_and_removed_after(
    inpainter: Inpainter, lora_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_kohya_lora(lora_dir / "tiny_style.safetensors", inpainter)
    unet, encoder = inpainter.components.unet, inpainter.components.text_encoders[0]
    to_q = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    conv1 = unet.down_blocks[0].resnets[0].conv1.weight
    before = {name: weight.detach().clone() for name, weight in [("to_q", to_q), ("conv1", conv1)]}
    q_proj = next(module for name, module in encoder.named_modules() if name.endswith("layers.0.self_attn.q_proj"))
    q_before = q_proj.weight.detach().clone()
    with inpainter.loras.applied((("tiny_style", 0.5, 2.0),)) as applied:
        assert applied == ["tiny_style"]
        assert not torch.equal(to_q, before["to_q"]) and not torch.equal(conv1, before["conv1"])
        assert not torch.equal(q_proj.weight, q_before)
    assert torch.equal(to_q, before["to_q"]) and torch.equal(conv1, before["conv1"])
    assert torch.equal(q_proj.weight, q_before)

    image = crop(64, 64)
    plain = inpainter.refine([job(image)], FAST)[0]
    styled, unstyled = inpainter.refine([job(image, loras=(("tiny_style", 1.0, 1.0),)), job(image)], FAST)
    assert not np.array_equal(styled, plain) and np.array_equal(unstyled, plain)
    with caplog.at_level(logging.WARNING):
        missing = inpainter.refine([job(image, loras=(("no_such_lora", 1.0, 1.0),))], FAST)[0]
    assert np.array_equal(missing, plain) and "no_such_lora" in caplog.text


def test_lora_merge_formula(inpainter: Inpainter, lora_dir: Path) -> None:
    """W + strength · alpha/rank · up @ down, as ComfyUI patches weights."""
    expected = write_kohya_lora(lora_dir / "formula.safetensors", inpainter)
    weight = inpainter.components.unet.down_blocks[0].resnets[0].conv1.weight
    original = weight.detach().clone()
    down, up, scale = expected["lora_unet_input_blocks_1_0_in_layers_2"]
    with inpainter.loras.applied((("formula", 0.5, 1.0),)):
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale * 0.5
        torch.testing.assert_close(weight, original + delta)


# ------------------------------------------------------------------ timings for the lead


def test_report_tiny_pipeline_timings(tiny_sd: dict, inpainter: Inpainter, capsys: pytest.CaptureFixture) -> None:
    started = time.perf_counter()
    Inpainter(tiny_sd["pipeline"], device="cpu")
    load = time.perf_counter() - started
    jobs = [job(crop(h, w, seed=i), seed=i, mask=box_mask(h, w)) for i, (h, w) in enumerate([(70, 90)] * 3)]
    started = time.perf_counter()
    inpainter.refine(jobs, SamplingSettings(steps=20, denoise=0.5))
    call = time.perf_counter() - started
    with capsys.disabled():
        print(f"\n[tiny SD on CPU] load {load:.2f}s; refine 3 crops 70x90, 20 steps: {call:.2f}s")
    assert call < 60


def test_docs_table_names_every_sampler_and_schedule() -> None:
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "samplers.md").read_text()
    for name in [*SAMPLER_NAMES, *SCHEDULER_NAMES]:
        assert re.search(rf"^\| `?{re.escape(name)}`? \|", text, flags=re.MULTILINE), name


# ------------------------------------------------------------------ Impact's denoise slicing


@pytest.mark.parametrize(("steps", "denoise"), [(4, 0.6), (7, 1.0)])
def test_unet_sees_impact_slicing_timesteps(inpainter: Inpainter, steps: int, denoise: float) -> None:
    """FaceDetailer samples through Impact's ksampler_wrapper: where its cut differs from KSampler's
    (ddim_uniform with a schedule longer than T + 1 sigmas), the UNet gets Impact's timesteps."""
    from deployments.sampling import sigmas_for

    settings = SamplingSettings(steps=steps, denoise=denoise, cfg=1.0, scheduler="ddim_uniform", noise_mask_feather=0)
    with UnetInputs(inpainter) as inputs:
        inpainter.refine([job(crop(64, 64), seed=3)], settings)
    timesteps = [float(t.reshape(-1)[0]) for t in inputs.timesteps]
    ms = inpainter.model_sampling
    impact = sigmas_for(ms, "euler", "ddim_uniform", steps, denoise, slicing="impact")
    ksampler = sigmas_for(ms, "euler", "ddim_uniform", steps, denoise)
    assert len(impact) == steps + 1
    assert impact.shape != ksampler.shape or not torch.equal(impact, ksampler)
    assert timesteps == [float(ms.timestep(sigma)) for sigma in impact[:-1]]
