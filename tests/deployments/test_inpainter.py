"""The diffusion inpainter on the tiny random-weight SD models (CPU, offline).

Random weights make noise, not faces: these tests check loading, shapes, determinism, batch
independence and ComfyUI's sampling arithmetic (steps/denoise, cycles, masks), not quality.

Batch independence on CPU: a crop's noise comes only from its own seed, but oneDNN picks
convolution kernels by batch size, so a crop sampled alone and in a batch differ by float32
round-off (measured: ≤ 4.3e-5 on latents of magnitude 1–22, ≤ 1.1e-5 on decoded [0, 1] pixels,
so at most one uint8 level). The tests allow 1e-4 on decoded pixels and 1 uint8 level: shared
or misassigned noise would differ by O(1).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from deployments.inpainter import Inpainter, RefineJob, SamplingSettings, UnsupportedSamplerError
from deployments.inpainter_samplers import SAMPLERS, schedulers_for, supported_samplers, supported_schedulers
from deployments.weights import CorruptWeightsError, WeightsNotFoundError

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

PIXEL_TOLERANCE = 1e-4  # decoded float pixels in [0, 1], crop alone vs in a batch (see module doc)
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


class UnetCalls:
    """Counts UNet forward passes (one per evaluation: CFG is batched)."""

    def __init__(self, inpainter: Inpainter) -> None:
        self.count = 0
        self.handle = inpainter.components.unet.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.count += 1

    def __enter__(self) -> UnetCalls:
        return self

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


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
    results = inpainter.refine(jobs, FAST)
    assert [result.shape for result in results] == [(h, w, 3) for h, w in sizes]
    assert all(result.dtype == np.uint8 for result in results)
    assert inpainter.last_call["batches"] == 3  # grouped by padded size: 72×96 (×2), 64×64, 40×48


def test_seeds_reproduce_bit_for_bit_and_differ(inpainter: Inpainter) -> None:
    image = crop(70, 90)
    first = inpainter.refine([job(image, seed=7)], FAST)[0]
    again = inpainter.refine([job(image, seed=7)], FAST)[0]
    other = inpainter.refine([job(image, seed=8)], FAST)[0]
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral", "dpmpp_2m_sde", "ddpm", "lcm"])
def test_a_crop_does_not_depend_on_its_batch_neighbours(
    inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch, sampler_name: str
) -> None:
    """Alone vs in one batch with a masked crop, an unmasked one and one of another size (72×96 unpadded)."""
    settings = replace_settings(FAST, sampler_name=sampler_name, scheduler="simple")
    jobs = [
        job(crop(70, 90, seed=1), seed=100, mask=box_mask(70, 90)),
        job(crop(70, 90, seed=2), seed=101),
        job(crop(72, 96, seed=3), seed=102, mask=box_mask(72, 96)),
    ]
    decoded = DecodedLatents(inpainter, monkeypatch)
    in_batch = inpainter.refine(jobs, settings)
    (_, batch_pixels), *_ = decoded.batches
    assert len(decoded.batches) == 1  # the three share one padded size: a single UNet batch
    for index, single in enumerate(jobs):
        alone = inpainter.refine([single], settings)[0]
        _, alone_pixels = decoded.batches[-1]
        assert float((alone_pixels[0] - batch_pixels[index]).abs().max()) <= PIXEL_TOLERANCE, index
        assert int(np.abs(alone.astype(int) - in_batch[index].astype(int)).max()) <= 1, index


def test_per_sample_scheduler_stepping_matches_generator_lists(
    inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path for stochastic schedulers that can't take a generator per sample (dpmpp_sde)."""
    settings = replace_settings(FAST, sampler_name="euler_ancestral")
    jobs = [job(crop(64, 64, seed=s), seed=s) for s in (1, 2)]
    batched = inpainter.refine(jobs, settings)
    monkeypatch.setitem(SAMPLERS, "euler_ancestral", replace(SAMPLERS["euler_ancestral"], per_sample_generators=False))
    stepped = inpainter.refine(jobs, settings)
    assert all(np.array_equal(a, b) for a, b in zip(batched, stepped, strict=True))


def replace_settings(settings: SamplingSettings, **changes: object) -> SamplingSettings:
    return settings.model_copy(update=changes)


# ------------------------------------------------------------------ ComfyUI sampling semantics


def test_steps_20_denoise_half_runs_20_unet_evaluations(inpainter: Inpainter) -> None:
    with UnetCalls(inpainter) as calls:
        inpainter.refine([job(crop(64, 64))], SamplingSettings(steps=20, denoise=0.5))
    assert calls.count == 20  # diffusers' strength would run 10


@pytest.mark.parametrize(("sampler_name", "expected"), [("heun", 2 * 5 - 1), ("dpm_2", 2 * 5 - 1), ("dpmpp_2m", 5)])
def test_evaluations_per_step_follow_the_sampler_order(inpainter: Inpainter, sampler_name: str, expected: int) -> None:
    """2nd-order samplers evaluate twice per step except the last (to sigma 0), as k-diffusion."""
    with UnetCalls(inpainter) as calls:
        inpainter.refine([job(crop(64, 64))], SamplingSettings(steps=5, denoise=0.4, sampler_name=sampler_name))
    assert calls.count == expected


def test_cycles_resample_the_latent_with_the_next_seed(inpainter: Inpainter) -> None:
    image = crop(64, 64)
    with UnetCalls(inpainter) as calls:
        two = inpainter.refine([job(image, seed=5)], replace_settings(FAST, cycle=2))[0]
    assert calls.count == 2 * FAST.steps
    one = inpainter.refine([job(image, seed=5)], FAST)[0]
    assert not np.array_equal(one, two)


def test_all_zero_noise_mask_returns_the_vae_round_trip(inpainter: Inpainter) -> None:
    image = crop(70, 90)
    result = inpainter.refine([job(image, mask=np.zeros((70, 90), np.float32))], FAST)[0]
    from deployments.inpainter import _pad_image, _to_pixels, _to_uint8

    with torch.inference_mode():
        pixels = _to_pixels(_pad_image(image, (72, 96)))[None]
        round_trip = _to_uint8(inpainter._decode(inpainter._encode(pixels))[0][:, :70, :90])
    assert np.array_equal(result, round_trip)


@pytest.mark.parametrize("feather", [0, 20])
def test_noise_mask_keeps_the_latent_outside_and_differential_diffusion_changes_soft_edges(
    inpainter: Inpainter, monkeypatch: pytest.MonkeyPatch, feather: int
) -> None:
    image = crop(64, 64)
    mask = np.zeros((64, 64), np.float32)
    mask[:, 32:] = 1.0  # latent columns 4..7 fully denoised
    mask[:32, 16:32] = 0.3  # latent rows 0..3, columns 2..3: soft edge
    decoded = DecodedLatents(inpainter, monkeypatch)
    settings = replace_settings(FAST, steps=10, noise_mask_feather=feather)
    inpainter.refine([job(image, mask=mask)], settings)
    inpainter.refine([job(image, mask=mask)], replace_settings(settings, noise_mask_feather=20 - feather))
    (latents, _), (other_mode, _) = decoded.batches
    from deployments.inpainter import _to_pixels

    with torch.inference_mode():
        original = inpainter._encode(_to_pixels(image)[None])
    assert torch.equal(latents[..., :2], original[..., :2])  # mask 0: untouched
    assert torch.equal(latents[..., 4:, 2:4], original[..., 4:, 2:4])
    assert not torch.allclose(latents[..., 4:], original[..., 4:])  # mask 1: sampled
    soft = (slice(None), slice(None), slice(0, 4), slice(2, 4))
    assert not torch.equal(latents[soft], other_mode[soft])  # thresholded vs blended soft edge
    assert torch.equal(latents[..., :2], other_mode[..., :2])


def test_inpainting_checkpoint_with_inpaint_model(inpaint_inpainter: Inpainter) -> None:
    jobs = [job(crop(70, 90), mask=box_mask(70, 90)), job(crop(64, 64))]  # the second has no mask
    results = inpaint_inpainter.refine(jobs, replace_settings(FAST, inpaint_model=True))
    assert [r.shape for r in results] == [(70, 90, 3), (64, 64, 3)]
    plain = inpaint_inpainter.refine(jobs[:1], FAST)[0]  # 9 channels fed with "all masked, grey"
    assert plain.shape == (70, 90, 3) and not np.array_equal(plain, results[0])


def test_inpaint_model_on_a_4_channel_unet_is_rejected(inpainter: Inpainter) -> None:
    with pytest.raises(ValueError, match="9-channel"):
        inpainter.refine([job(crop(64, 64), mask=box_mask(64, 64))], replace_settings(FAST, inpaint_model=True))


def test_sdxl_conditioning(sdxl_inpainter: Inpainter) -> None:
    jobs = [job(crop(70, 90), mask=box_mask(70, 90)), job(crop(64, 64), positive=("a", "b BREAK c"))]
    results = sdxl_inpainter.refine(jobs, FAST)
    assert [r.shape for r in results] == [(70, 90, 3), (64, 64, 3)]


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


def test_every_supported_sampler_and_scheduler_runs(inpainter: Inpainter) -> None:
    image = crop(40, 48)
    pairs = [(sampler, scheduler) for sampler in supported_samplers() for scheduler in schedulers_for(sampler)]
    assert len(pairs) >= 60 and set(supported_schedulers()) >= {"normal", "karras", "simple", "sgm_uniform"}
    for sampler, scheduler in pairs:
        settings = SamplingSettings(steps=3, denoise=0.6, sampler_name=sampler, scheduler=scheduler)
        result = inpainter.refine([job(image, mask=box_mask(40, 48))], settings)[0]
        assert result.shape == (40, 48, 3), (sampler, scheduler)


def test_unsupported_names_list_the_supported_ones(inpainter: Inpainter) -> None:
    with pytest.raises(UnsupportedSamplerError, match="supported: euler, euler_ancestral"):
        inpainter.validate_settings(SamplingSettings(sampler_name="res_multistep"))
    with pytest.raises(UnsupportedSamplerError, match="supported: normal, karras"):
        inpainter.validate_settings(SamplingSettings(scheduler="kl_optimal"))
    with pytest.raises(UnsupportedSamplerError, match="with 'ddim' use one of: normal"):
        inpainter.validate_settings(SamplingSettings(sampler_name="ddim", scheduler="karras"))
    with pytest.raises(UnsupportedSamplerError, match="LCM|lcm|original"):
        inpainter.validate_settings(SamplingSettings(sampler_name="lcm", scheduler="simple", steps=40, denoise=0.5))
    if "dpmpp_sde" not in supported_samplers():
        with pytest.raises(UnsupportedSamplerError, match="torchsde"):
            inpainter.validate_settings(SamplingSettings(sampler_name="dpmpp_sde"))
    assert inpainter.supported_samplers() == supported_samplers()


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
    from deployments.inpainter_samplers import SCHEDULES

    text = (Path(__file__).resolve().parents[2] / "docs" / "samplers.md").read_text()
    for name in [*SAMPLERS, *SCHEDULES]:
        assert f"| `{name}` |" in text, name
