"""The ``sim://`` stand-ins: their cost model, their call signatures, and results one can check.

The simulated UNet is an exact denoiser towards a documented target (the prompt's colour inside
the noise mask), so every sampler must land on it; the VAE is an 8×8 average. These tests
recompute the expected pixels from the documented formulas, independently of the module.
"""

from __future__ import annotations

import math
import re
import time
import zlib

import numpy as np
import pytest
import torch

from deployments import simulated
from deployments.inpainter import Inpainter, RefineJob, SamplingSettings
from deployments.model_loading import load_detector, load_inpainter, load_segmenter
from deployments.weights import WeightsNotFoundError, resolve_weights
from facedetailer.params import FaceDetailerParams
from facedetailer.sam_prompts import SamPrompt

FAST = {"a": 0.002, "b": 0.0005}


def sim(kind: str, **options: float) -> str:
    query = "&".join(f"{name}={value}" for name, value in {**FAST, **options}.items())
    return f"sim://{kind}?{query}"


@pytest.fixture(scope="module")
def inpainter() -> Inpainter:
    return load_inpainter(sim("sd15"), device="cpu")


@pytest.fixture(scope="module")
def inpaint_inpainter() -> Inpainter:
    return load_inpainter(sim("sd15-inpainting"), device="cpu")


# ------------------------------------------------------------------ the documented formulas


def word_vector(word: str) -> np.ndarray:
    """First 4 dims of a word's embedding: sin(2π·frac(id·φ·k) + k − 1), k = 1…4."""
    token = zlib.crc32(word.encode()) % 49406
    golden = (5**0.5 - 1) / 2
    return np.array([math.sin(2 * math.pi * ((token * (k * golden)) % 1.0) + k - 1) for k in range(1, 5)])


def prompt_colour(text: str) -> np.ndarray:
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    return np.mean([word_vector(word) for word in words], axis=0) if words else np.zeros(4)


def to_uint8(latent_rgb: np.ndarray) -> np.ndarray:
    return np.round(np.clip((latent_rgb + 1.0) / 2.0, 0, 1) * 255).astype(np.uint8)


def block_average(image: np.ndarray) -> np.ndarray:
    """The VAE round trip: each 8×8 block replaced by its mean."""
    height, width = image.shape[:2]
    pixels = image.astype(np.float64) / 127.5 - 1.0
    blocks = pixels.reshape(height // 8, 8, width // 8, 8, 3).mean(axis=(1, 3))
    return to_uint8(np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1))


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.float32)
    mask[16:48, 16:48] = 1.0
    return mask


# ------------------------------------------------------------------ references and the cost model


def test_defaults_reproduce_the_published_a100_figures() -> None:
    """a + b·n with n = 2·batch (CFG): 22.24 it/s at batch 1, 11.67 it/s at batch 4, 2.1× images·it/s."""
    step = {batch: simulated.UNET_A_S + simulated.UNET_B_S * 2 * batch for batch in (1, 4)}
    assert 1 / step[1] == pytest.approx(22.24, rel=1e-9)
    assert 1 / step[4] == pytest.approx(11.67, rel=1e-9)
    assert (4 / step[4]) / (1 / step[1]) == pytest.approx(2.1, abs=0.01)
    assert simulated.UNET_A_S > 0 and simulated.UNET_B_S > 0


def test_references_parse_and_bad_ones_say_why() -> None:
    kind, options = simulated.parse_sim_reference("sim://sd15?a=0.5&area=0", ["sd15"], simulated.INPAINTER_OPTIONS)
    assert kind == "sd15" and options["a"] == 0.5 and options["area"] == 0.0
    assert options["b"] == simulated.UNET_B_S
    with pytest.raises(ValueError, match="unknown option 'speed'.*a, b, area, vae, vae_encode, vae_decode, text"):
        simulated.parse_sim_reference("sim://sd15?speed=2", ["sd15"], simulated.INPAINTER_OPTIONS)
    with pytest.raises(ValueError, match="unknown simulated model 'sdxl'"):
        load_inpainter("sim://sdxl", device="cpu")
    with pytest.raises(ValueError, match=">= 0"):
        load_detector("sim://detector?cost=-1")
    with pytest.raises(ValueError, match="not a number"):
        load_segmenter("sim://sam?encoder=fast")
    with pytest.raises(WeightsNotFoundError, match="no weights"):
        resolve_weights("sim://sd15")


def test_a_unet_evaluation_of_n_latents_costs_a_plus_b_n_asleep() -> None:
    """Modelled time a + b·n·(area / 64²) per evaluation, n = the UNet's batch (CFG doubles it)."""
    inpainter = load_inpainter("sim://sd15?a=0.08&b=0.02&area=1", device="cpu")
    calls = inpainter.components.unet.accelerator.calls
    jobs = [RefineJob(image=textured(128, 64, seed=k), noise_mask=None, positive=("face",), negative=(), seed=k)
            for k in range(3)]
    settings = SamplingSettings(steps=4, denoise=1.0, cfg=5.0)
    inpainter.refine(jobs[:1], settings)  # warm-up: imports and scheduler set-up
    calls.clear()
    wall = time.perf_counter()
    inpainter.refine(jobs, settings)
    wall = time.perf_counter() - wall
    unet_calls = [call for call in calls if call.operation == "unet"]
    assert len(unet_calls) == 4  # one evaluation per step, the 3 crops and CFG in one batch
    area = (128 // 8) * (64 // 8) / 64**2
    for call in unet_calls:
        assert call.batch == 6
        assert call.modelled_s == pytest.approx(0.08 + 0.02 * 6 * area)
        assert call.elapsed_s >= call.modelled_s
    assert wall >= sum(call.modelled_s for call in unet_calls)


def test_the_modelled_time_is_slept_not_computed() -> None:
    """A 0.6 s evaluation of 16 latents at 128×128 holds the CPU for a small fraction of it."""
    parts = simulated.load_simulated_components("sim://sd15?a=0.5&b=0.0015625")
    accelerator = parts.unet.accelerator
    sample, context = torch.randn(16, 4, 128, 128), torch.randn(16, 77, 768)
    parts.unet(sample, 500, context)  # warm-up
    accelerator.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    parts.unet(sample, 500, context)
    accelerator.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall >= 0.5 + 0.0015625 * 16 * 4
    assert cpu < 0.25 * wall, f"{cpu:.2f} s of CPU in a {wall:.2f} s evaluation"


def test_one_accelerator_runs_one_evaluation_at_a_time() -> None:
    import threading

    components = simulated.load_simulated_components("sim://sd15?a=0.2&b=0")
    unet = components.unet
    sample, context = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 768)
    started = time.perf_counter()
    threads = [threading.Thread(target=unet, args=(sample, 500, context)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    unet.accelerator.synchronize()
    assert time.perf_counter() - started >= 0.6  # serialised, as on one GPU
    calls = list(unet.accelerator.calls)
    assert len(calls) == 3
    for before, after in zip(calls, calls[1:], strict=False):
        assert after.started >= before.ended


# ------------------------------------------------------------------ the device's timing model


def launch(accelerator: simulated.SimulatedAccelerator, seconds: float) -> float:
    """One piece of work; returns how long the launch blocked the caller."""
    started = time.perf_counter()
    with accelerator.occupy("work", seconds):
        pass
    return time.perf_counter() - started


def test_a_launch_returns_before_its_work_ends_and_synchronize_waits_for_it() -> None:
    accelerator = simulated.SimulatedAccelerator("test")
    assert launch(accelerator, 0.3) < 0.15, "an idle device takes the work at once: the launch does not wait"
    [call] = accelerator.calls
    assert call.elapsed_s == call.modelled_s == 0.3 and call.ended == call.started + 0.3
    assert accelerator.idle_at == call.ended > time.perf_counter()
    accelerator.synchronize()
    now = time.perf_counter()
    assert call.ended <= now < call.ended + 0.15, "synchronize returns when the modelled work has ended"
    assert accelerator.busy_s == pytest.approx(0.3) and accelerator.summary()["calls"] == 1


def test_launch_k_plus_1_waits_until_call_k_has_ended() -> None:
    """The launch queue holds one call: the host runs at most one call ahead of the device."""
    accelerator = simulated.SimulatedAccelerator("test")
    launch(accelerator, 0.2)
    launch(accelerator, 0.2)
    returned = time.perf_counter()
    first, second = accelerator.calls
    assert returned >= first.ended, "the second launch returned before the first call ended"
    assert second.started == first.ended, "the device runs queued work back to back"
    assert returned < second.ended, "…and the second call is still running when its launch returns"
    accelerator.synchronize()


def test_host_work_shorter_than_the_device_time_does_not_lengthen_a_sequence() -> None:
    """Four 0.1 s calls with 0.06 s of host work after each: 0.4 s asynchronous, 0.64 s with ``sync``."""
    walls = {}
    for mode in ("async", "sync"):
        accelerator = simulated.SimulatedAccelerator("test", synchronous=mode == "sync")
        started = time.perf_counter()
        for _ in range(4):
            launch(accelerator, 0.1)
            time.sleep(0.06)  # the sampler's arithmetic between two UNet calls
        accelerator.synchronize()
        walls[mode] = time.perf_counter() - started
        calls = list(accelerator.calls)
        assert [call.modelled_s for call in calls] == [0.1] * 4
        if mode == "async":
            assert all(after.started == before.ended for before, after in zip(calls, calls[1:], strict=False))
            assert accelerator.busy_s == pytest.approx(0.4)
        else:  # the old model: the caller waits out each call, busy time is what it took
            assert all(call.elapsed_s >= call.modelled_s for call in calls)
            assert all(after.started >= before.ended + 0.05 for before, after in zip(calls, calls[1:], strict=False))
    assert 0.4 <= walls["async"] < 0.52, walls
    assert walls["sync"] >= 0.64, walls


def test_vae_encode_and_decode_cost_their_own_seconds_scaled_by_the_latent_area() -> None:
    """``vae_encode`` / ``vae_decode`` per 512×512 image (``vae`` sets both), ×(latent area / 64²) unless area=0."""
    job = RefineJob(image=textured(128, 64), noise_mask=None, positive=("face",), negative=(), seed=1)
    settings = SamplingSettings(steps=1, denoise=0.5, cfg=1.0)
    area = (128 // 8) * (64 // 8) / 64**2
    for query, encode, decode in [
        ("vae_encode=0.3&vae_decode=0.6", 0.3 * area, 0.6 * area),
        ("vae=0.2", 0.2 * area, 0.2 * area),
        ("vae=0.2&vae_decode=0.4", 0.2 * area, 0.4 * area),
        ("vae_encode=0.3&vae_decode=0.6&area=0", 0.3, 0.6),
        ("", 0.0, 0.0),
    ]:
        inpainter = load_inpainter("sim://sd15?a=0.001&b=0" + (f"&{query}" if query else ""), device="cpu")
        accelerator = inpainter.components.unet.accelerator
        inpainter.refine([job], settings)
        modelled = {call.operation: call.modelled_s for call in accelerator.calls if call.operation.startswith("vae")}
        assert modelled == {"vae_encode": pytest.approx(encode), "vae_decode": pytest.approx(decode)}, query
        info = inpainter.info()["simulated"]
        assert (info["vae_encode_s"], info["vae_decode_s"]) == pytest.approx(
            (encode / (1 if "area=0" in query else area), decode / (1 if "area=0" in query else area))
        )
    assert (simulated.SD15_VAE_ENCODE_S, simulated.SD15_VAE_DECODE_S) == (0.015, 0.031)  # diffusers' RTX 4090 table


def test_a_crops_host_preparation_runs_while_the_device_encodes_it() -> None:
    """As on a GPU: the host prepares mask, prompt and sampler while the VAE encode runs, and the
    first UNet call starts the moment the encode ends; the decode starts once the last call and
    the engine's check of its latent are done, and the result waits for the decode."""
    job = RefineJob(image=textured(128, 128), noise_mask=box_mask(128, 128), positive=("face",), negative=(), seed=2)
    inpainter = load_inpainter("sim://sd15?a=0.01&b=0&area=0&vae_encode=0.25&vae_decode=0.05", device="cpu")
    accelerator = inpainter.components.unet.accelerator
    settings = SamplingSettings(steps=3, denoise=0.5, cfg=5.0, sampler_name="euler")
    inpainter.refine([job], settings)  # the prompts' embeddings are remembered from here on
    accelerator.calls.clear()
    started = time.perf_counter()
    inpainter.refine([job], settings)
    ended = time.perf_counter()
    calls = list(accelerator.calls)
    assert [call.operation for call in calls] == ["vae_encode"] + ["unet"] * 3 + ["vae_decode"]
    encode, first_unet, last_unet, decode = calls[0], calls[1], calls[-2], calls[-1]
    assert first_unet.started == encode.ended  # back to back: the preparation was hidden
    assert decode.started >= last_unet.ended and ended >= decode.ended
    assert ended - started >= 0.25 + 3 * 0.01 + 0.05


def test_the_sync_option_selects_the_synchronous_device() -> None:
    assert not load_inpainter(sim("sd15"), device="cpu").components.unet.accelerator.synchronous
    assert load_inpainter(sim("sd15", sync=1), device="cpu").components.unet.accelerator.synchronous
    assert load_detector("sim://detector?sync=1").accelerator.synchronous
    assert load_segmenter("sim://sam?sync=1").info()["simulated"]["mode"] == "sync"
    with pytest.raises(ValueError, match="sync must be 0 or 1"):
        simulated.parse_sim_reference("sim://sd15?sync=2", ["sd15"], simulated.INPAINTER_OPTIONS)


def test_a_refined_crop_comes_back_after_its_device_work_and_equal_in_both_modes() -> None:
    """The decoded pixels are read on the host only once the device has run everything for them."""
    job = RefineJob(image=textured(64, 64), noise_mask=box_mask(64, 64), positive=("red face",), negative=(), seed=3)
    settings = SamplingSettings(steps=3, denoise=0.6, cfg=4.0, sampler_name="dpm_adaptive")  # reads its error
    images = {}
    for mode in ("0", "1"):
        inpainter = load_inpainter("sim://sd15?a=0.02&b=0.002&vae=0.01&sync=" + mode, device="cpu")
        accelerator = inpainter.components.unet.accelerator
        [images[mode]] = inpainter.refine([job], settings)
        assert accelerator.idle_at <= time.perf_counter()
        operations = [call.operation for call in accelerator.calls]
        assert operations[0] in ("vae_encode", "text_encoder") and operations[-1] == "vae_decode"
        assert accelerator.busy_s >= sum(call.modelled_s for call in accelerator.calls) - 1e-9
    np.testing.assert_array_equal(images["0"], images["1"])


# ------------------------------------------------------------------ stand-ins with diffusers' signatures


def test_stand_ins_have_the_loaded_components_signatures_and_configs() -> None:
    parts = simulated.load_simulated_components("sim://sd15-inpainting")
    assert parts.is_inpaint and not parts.is_sdxl and parts.format == "simulated"
    assert parts.unet.config.in_channels == 9 and parts.unet.config.cross_attention_dim == 768
    assert parts.vae.config.scaling_factor == pytest.approx(0.18215)
    assert parts.text_encoders[0].config.max_position_embeddings == 77
    tokenizer = parts.tokenizers[0]
    ids = tokenizer("A red face", add_special_tokens=False).input_ids
    assert ids == [zlib.crc32(word.encode()) % 49406 for word in ("a", "red", "face")]
    padded = tokenizer(["a red face"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert padded.input_ids.shape == (1, 77) and padded.input_ids[0, 0] == 49406
    output = parts.text_encoders[0](padded.input_ids, output_hidden_states=True)
    assert output.last_hidden_state.shape == (1, 77, 768) and len(output.hidden_states) == 2
    np.testing.assert_allclose(output.last_hidden_state[0, 2, :4].numpy(), word_vector("red"), atol=1e-6)
    assert torch.count_nonzero(output.last_hidden_state[0, 4:]) == 0  # EOS and padding
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    latents = parts.vae.encode(pixels).latent_dist.mean
    assert latents.shape == (2, 4, 8, 6)
    decoded = parts.vae.decode(latents, return_dict=False)[0]
    torch.testing.assert_close(decoded[:, :, :8, :8].mean(dim=(2, 3)), pixels[:, :, :8, :8].mean(dim=(2, 3)))
    sample = torch.randn(2, 9, 8, 6)
    noise = parts.unet(sample, torch.tensor(500), output.last_hidden_state.repeat(2, 1, 1), return_dict=False)[0]
    assert noise.shape == (2, 4, 8, 6) and torch.isfinite(noise).all()
    assert parts.unet(sample, 500, output.last_hidden_state.repeat(2, 1, 1)).sample.shape == noise.shape
    with pytest.raises(ValueError, match="9 channels"):
        parts.unet(torch.zeros(1, 4, 8, 8), 500, output.last_hidden_state)


def test_the_unet_predicts_the_noise_that_denoises_to_its_target() -> None:
    """x_t = √ᾱ·target + √(1 − ᾱ)·ε  ⇒  the UNet returns ε (ᾱ from SD 1.5's schedule)."""
    parts = simulated.load_simulated_components("sim://sd15")
    tokenizer, encoder = parts.tokenizers[0], parts.text_encoders[0]
    ids = torch.tensor([tokenizer("smiling face", padding="max_length", max_length=77, truncation=True).input_ids])
    context = encoder(ids).last_hidden_state
    target = torch.from_numpy(prompt_colour("smiling face")).float()[None, :, None, None]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[321].float()
    noise = torch.randn(1, 4, 8, 8)
    x_t = alpha_bar.sqrt() * target + (1 - alpha_bar).sqrt() * noise
    predicted = parts.unet(x_t, 321, context).sample
    torch.testing.assert_close(predicted, noise, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ the real inpainter on the stand-ins


@pytest.mark.parametrize(
    ("sampler_name", "scheduler"),
    [
        ("euler", "normal"),
        ("dpmpp_2m", "karras"),
        ("heun", "simple"),
        ("euler_ancestral", "normal"),
        ("ddim", "normal"),
    ],
)
def test_every_sampler_lands_on_the_prompt_colour_inside_the_mask(
    inpainter: Inpainter, sampler_name: str, scheduler: str
) -> None:
    image = textured(64, 64)
    job = RefineJob(image=image, noise_mask=box_mask(64, 64), positive=("a red face",), negative=(), seed=3)
    settings = SamplingSettings(steps=6, denoise=0.6, cfg=1.0, sampler_name=sampler_name, scheduler=scheduler,
                                noise_mask_feather=0)
    refined = inpainter.refine([job], settings)[0]
    colour = to_uint8(prompt_colour("a red face")[:3])
    assert np.abs(refined[16:48, 16:48].astype(int) - colour).max() <= 1
    outside = box_mask(64, 64) == 0
    assert np.abs(refined[outside].astype(int) - block_average(image)[outside]).max() <= 1


def test_batched_crops_keep_their_own_prompts_and_cfg_extrapolates(inpainter: Inpainter) -> None:
    """Three crops in one batch, each with its own prompt: a mix-up would show as a wrong colour."""
    prompts = ["a red face", "a blue face", "smiling, freckles"]
    jobs = [RefineJob(image=textured(64, 64, seed=k), noise_mask=None, positive=(text,), negative=("blurry",), seed=k)
            for k, text in enumerate(prompts)]
    settings = SamplingSettings(steps=4, denoise=0.5, cfg=2.5)
    refined = inpainter.refine(jobs, settings)
    negative = prompt_colour("blurry")
    for text, image in zip(prompts, refined, strict=True):
        expected = to_uint8((negative + 2.5 * (prompt_colour(text) - negative))[:3])
        assert np.abs(image.reshape(-1, 3).astype(int) - expected).max() <= 1, text
    assert len({tuple(image[0, 0]) for image in refined}) == 3


def test_inpainting_unet_keeps_the_masked_image_outside_its_mask(inpaint_inpainter: Inpainter) -> None:
    image = textured(64, 64, seed=5)
    job = RefineJob(image=image, noise_mask=box_mask(64, 64), positive=("portrait",), negative=(), seed=1)
    settings = SamplingSettings(steps=5, denoise=1.0, cfg=1.0, inpaint_model=True, noise_mask_feather=0)
    refined = inpaint_inpainter.refine([job], settings)[0]
    assert np.abs(refined[16:48, 16:48].astype(int) - to_uint8(prompt_colour("portrait")[:3])).max() <= 1
    outside = box_mask(64, 64) == 0
    assert np.abs(refined[outside].astype(int) - block_average(image)[outside]).max() <= 1
    info = inpaint_inpainter.info()
    assert info["format"] == "simulated" and info["simulated"]["calls"] > 0


# ------------------------------------------------------------------ detector and SAM


def test_simulated_detector_finds_faces_in_the_most_textured_cells() -> None:
    image = np.full((200, 300, 3), 128, np.uint8)
    image[100:200, 150:300] = textured(100, 150, seed=1)  # bottom-right cell of a 2×2 grid
    image[0:100, 0:150] = (textured(100, 150, seed=2) // 8) + 100  # top-left, lower contrast
    detector = load_detector("sim://detector?faces=3&size=0.5&cost=0.001")
    assert isinstance(detector, simulated.SimulatedDetector)
    detections = detector.detect(image, 0.5)
    assert [d.bbox for d in detections] == [(200.0, 125.0, 250.0, 175.0), (50.0, 25.0, 100.0, 75.0)]
    assert detections[0].confidence > detections[1].confidence > 0.5 and detections[0].mask is None
    assert detector.detect(image, 0.5) == detections  # deterministic
    assert detector.detect(np.zeros((64, 64, 3), np.uint8), 0.5) == []  # a flat image has no face
    segm = load_detector("sim://detector?faces=1", task="segment")
    [face] = segm.detect(image, 0.3)
    assert face.mask is not None and face.mask.shape == (200, 300) and face.mask[150, 225] == 1.0
    assert face.mask[:, :150].sum() == 0
    assert segm.info()["simulated"]["calls"] == 1


def test_simulated_sam_answers_each_prompt_inside_its_box() -> None:
    image = textured(120, 160)
    sam = load_segmenter("sim://sam?encoder=0.001&decoder=0.001")
    assert isinstance(sam, simulated.SimulatedSegmenter)
    box_prompt = SamPrompt(box=(40.0, 20.0, 100.0, 90.0), points=((70.0, 55.0),), labels=(1,))
    points_prompt = SamPrompt(box=None, points=((20.0, 20.0), (30.0, 40.0), (5.0, 5.0)), labels=(1, 1, 0))
    empty = SamPrompt(box=None, points=(), labels=())
    boxed, pointed, nothing = sam.predict(image, [box_prompt, points_prompt, empty])
    assert boxed.masks.shape == (3, 120, 160) and boxed.masks.dtype == bool
    assert boxed.masks[0, 55, 70] and not boxed.masks[0, 10, 10] and not boxed.masks[:, :, :40].any()
    assert boxed.masks[0].sum() > boxed.masks[1].sum() > boxed.masks[2].sum() > 0
    assert list(boxed.scores) == sorted(boxed.scores, reverse=True) and boxed.scores[0] > 0.93
    assert pointed.masks[0, 30, 25] and not pointed.masks[0, 100, 150]
    assert nothing.masks.shape == (0, 120, 160)
    assert sam.info()["simulated"]["calls"] == 1


def test_the_whole_cycle_on_simulated_models_changes_only_the_faces() -> None:
    """Detector, SAM and inpainter all simulated, through the real FaceDetailer cycle in-process."""
    from serve_app.local import LocalStages

    image = np.full((256, 256, 3), 90, np.uint8)
    image[128:, 128:] = textured(128, 128, seed=3)
    stages = LocalStages(
        detector=load_detector("sim://detector?faces=1&cost=0.001"),
        inpainter=load_inpainter(sim("sd15"), device="cpu"),
        sam=load_segmenter("sim://sam?encoder=0.001"),
    )
    params = FaceDetailerParams(steps=3, cfg=1.0, positive="a red face", guide_size=128, max_size=256, use_sam=True)
    result = stages.detail([image], params)
    [segment] = result.per_image[0].segments
    assert segment.bbox == (160.0, 160.0, 224.0, 224.0) and not segment.skipped
    detailed = result.images[0]
    x1, y1, x2, y2 = segment.crop_region
    changed = np.any(detailed != image, axis=2)
    assert changed[y1:y2, x1:x2].any() and not changed[:y1].any() and not changed[:, :x1].any()
    assert np.abs(detailed[192, 192].astype(int) - to_uint8(prompt_colour("a red face")[:3])).max() <= 2
    again = stages.detail([image], params)
    assert np.array_equal(again.images[0], detailed)


def test_crops_whose_prompts_differ_in_length_never_share_a_unet_call():
    """Every row of a UNet call attends to the lcm of the rows' context lengths: a request's long
    prompts must not lengthen another crop's context (limits.max_prompt_tokens bounds each face)."""

    def jobs(positives: list[str]) -> list[RefineJob]:
        pixels = np.full((64, 64, 3), 120, np.uint8)
        return [RefineJob(image=pixels, noise_mask=None, positive=(text,), negative=("",), seed=k)
                for k, text in enumerate(positives)]  # fmt: skip

    settings = SamplingSettings(steps=3, denoise=1.0)
    for positives, batch_sizes in ((["a face", "a smile"], {2}), (["a face", "word " * 100], {1})):
        inpainter = load_inpainter("sim://sd15?a=0&b=0", device="cpu")
        inpainter.refine_result(jobs(positives), settings)
        assert set(inpainter.engine.snapshot()["unet_batch_sizes"]) == batch_sizes, positives


def test_the_ingress_counts_the_windows_the_text_encoder_reads():
    """``count_prompt_windows`` with the tokenizers ``prompt_tokenizers()`` hands out (pickled, as Ray
    sends them to the ingress) equals the context the inpainter encodes, 77 tokens per window."""
    import pickle

    from deployments.inpainter import count_prompt_windows

    inpainter = load_inpainter("sim://sd15?a=0&b=0", device="cpu")
    tokenizers = pickle.loads(pickle.dumps(inpainter.prompt_tokenizers()))
    for chunks in [(), ("a face",), ("word " * 75,), ("word " * 76,), ("a", "b BREAK c"), ("(smile:1.3) " * 40,)]:
        hidden, _ = inpainter._encode_prompt(tuple(chunks) or ("",))
        assert hidden.shape[1] == 77 * count_prompt_windows(tokenizers, chunks), chunks
