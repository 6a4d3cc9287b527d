"""The model families' own formulas and contracts (deployments/families), on the tiny random-weight models.

Parity of the Flux and SD3 forward and text conditioning with ComfyUI's implementation is measured
by benchmarks/family_parity.py (docs/models.md); these tests check what can be checked here: the
packing and the Fill conditioning against diffusers' own pipeline helpers and hand-built
layouts, what each family feeds its transformer (timesteps, guidance rows, text lengths), the
detection rules on key lists, the loading layouts against each other, and what is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.families import CheckpointSource, FamilyRow, TextConditioning, load_family
from deployments.families.detection import UnsupportedModelError, detect_diffusion_model, read_header
from deployments.families.dit import pad_to_patch_size, rows_by_length
from deployments.families.flux import FLUX_LATENT, fill_concat, pack_latents, pack_mask, position_ids, unpack_latents
from deployments.families.flux_keys import flux_from_diffusers, flux_to_diffusers
from deployments.families.text import t5_tokens
from deployments.inpainter import Inpainter, RefineJob, SamplingSettings

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CPU = torch.device("cpu")


def crop(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def job(seed: int = 1, negative: tuple[str, ...] | None = ("blurry",), **kwargs: object) -> RefineJob:
    mask = np.zeros((40, 40), np.float32)
    mask[8:32, 10:30] = 1.0
    return RefineJob(image=crop(64, 64, seed), noise_mask=mask, positive=("a face",), negative=negative, seed=seed,
                     **kwargs)  # fmt: skip


FLOW = SamplingSettings(steps=2, cfg=1.0, denoise=0.6)


@pytest.fixture(scope="module")
def flux_dev(tiny_flux_dev: dict) -> Inpainter:
    return Inpainter(tiny_flux_dev["pipeline"], device="cpu")


@pytest.fixture(scope="module")
def flux_fill(tiny_flux_fill: dict) -> Inpainter:
    return Inpainter(tiny_flux_fill["pipeline"], device="cpu")


@pytest.fixture(scope="module")
def sd3(tiny_sd3: dict) -> Inpainter:
    return Inpainter(tiny_sd3["pipeline"], device="cpu")


class Calls:
    """Records every call of a model's forward (its keyword arguments)."""

    def __init__(self, module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        original = module.forward

        def forward(*args: object, **kwargs: object) -> object:
            self.calls.append(dict(kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "forward", forward)


# ------------------------------------------------------------------ packing and Fill conditioning


def test_packing_matches_diffusers_own_pipeline_helpers_and_round_trips() -> None:
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    # token (i, j), feature c·4 + 2·ph + pw is x[c, 2i + ph, 2j + pw]
    assert packed[1, 1 * 5 + 3, 7 * 4 + 2 * 1 + 0] == x[1, 7, 2 * 1 + 1, 2 * 3 + 0]
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8))
    ids = position_ids(3, 5, CPU)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(1, 3, 5, CPU, torch.float32))
    assert ids[7].tolist() == [0.0, 1.0, 2.0]


def test_odd_latents_are_padded_circularly_as_comfyui_does() -> None:
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(1, 2, 3, 5)
    padded = pad_to_patch_size(x, 2)
    assert padded.shape == (1, 2, 4, 6)
    assert torch.equal(padded[..., 3, :5], x[..., 0, :]) and torch.equal(padded[..., :3, 5], x[..., :, 0])
    assert pad_to_patch_size(padded, 2) is padded


def test_the_fill_mask_is_packed_eight_by_eight_into_64_channels() -> None:
    mask = torch.rand(1, 1, 16, 24)
    packed = pack_mask(mask, (2, 3))
    assert packed.shape == (1, 64, 2, 3)
    # channel 8·ph + pw of cell (i, j) is the pixel (8i + ph, 8j + pw), unrounded
    for ph, pw, i, j in [(0, 0, 0, 0), (3, 5, 1, 2), (7, 7, 1, 0)]:
        assert packed[0, 8 * ph + pw, i, j] == mask[0, 0, 8 * i + ph, 8 * j + pw]
    # a latent-grid mask is first resized to 8× bilinearly (ComfyUI's common_upscale); channels are averaged
    small = torch.rand(1, 4, 2, 3)
    resized = torch.nn.functional.interpolate(small.mean(1, keepdim=True), size=(16, 24), mode="bilinear")
    assert torch.allclose(pack_mask(small, (2, 3)), pack_mask(resized, (2, 3)))
    latent = torch.randn(1, 16, 2, 3)
    concat = fill_concat(latent, mask, (2, 3))
    assert concat.shape == (1, 80, 2, 3) and torch.equal(concat[:, :16], latent) and torch.equal(concat[:, 16:], packed)


def test_fill_without_inpaint_model_conditioning_gets_a_zero_image_and_the_noise_mask(flux_fill: Inpainter) -> None:
    family = flux_fill.family
    latent = torch.randn(1, 16, 4, 4)
    concat, per_cycle = family.default_concat(latent, None)
    assert not per_cycle and concat.shape == (1, 80, 4, 4)
    assert torch.allclose(concat[:, :16], torch.full_like(latent, (0.0 - 0.1159) * 0.3611))  # process_in(0)
    assert torch.equal(concat[:, 16:], torch.ones(1, 64, 4, 4))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1.0
    concat, _ = family.default_concat(latent, mask)
    assert torch.equal(concat[:, 16:], pack_mask(mask, (4, 4)))


def test_inpaint_model_on_fill_feeds_96_channels_with_the_unrounded_mask(flux_fill: Inpainter, monkeypatch) -> None:
    calls = Calls(flux_fill.family.denoiser, monkeypatch)
    mask = np.zeros((40, 40), np.float32)
    mask[8:32, 10:30] = 0.3  # a soft mask: Fill's mask channels are not rounded (SD's 9-channel UNet's are)
    one = RefineJob(image=crop(64, 64), noise_mask=mask, positive=("a face",), negative=None, seed=2)
    flux_fill.refine([one], SamplingSettings(steps=1, cfg=1.0, denoise=0.5, inpaint_model=True, noise_mask_feather=0))
    hidden = calls.calls[0]["hidden_states"]
    assert hidden.shape == (1, 4 * 4, 96 * 4)  # a 64-pixel crop: an 8×8 latent, 4×4 tokens
    grid = unpack_latents(hidden, 8, 8)
    mask_channels = grid[:, 32:]
    assert 0.0 < float(mask_channels.max()) < 1.0 and not torch.equal(mask_channels, mask_channels.round())


# ------------------------------------------------------------------ what the transformers are fed


def test_flux_gets_sigma_as_timestep_and_each_rows_guidance(flux_dev: Inpainter, monkeypatch) -> None:
    calls = Calls(flux_dev.family.denoiser, monkeypatch)
    jobs = [job(1, settings=SamplingSettings(steps=2, cfg=1.0, denoise=0.6, guidance=2.0)),
            job(2, settings=SamplingSettings(steps=2, cfg=1.0, denoise=0.6, guidance=7.5))]  # fmt: skip
    flux_dev.refine(jobs)
    first = calls.calls[0]
    assert first["guidance"].tolist() == [2.0, 7.5], "one model call, each row its own guidance"
    sigmas = flux_dev.model_sampling.describe()
    assert sigmas["kind"] == "flux" and sigmas["shift"] == 1.15
    assert 0.0 < float(first["timestep"][0]) < 1.0, "Flux is fed sigma (diffusers multiplies by 1000 itself)"
    assert first["encoder_hidden_states"].shape[1] == 256, "T5 padded to ComfyUI's Flux minimum of 256"
    assert len(calls.calls) == 2, "cfg 1: one model call per step for both crops"


def test_schnell_has_no_guidance_embedding_and_its_own_model_sampling(tiny_flux_schnell: dict, monkeypatch) -> None:
    schnell = Inpainter(tiny_flux_schnell["pipeline"], device="cpu")
    assert schnell.family.variant == "schnell" and not schnell.family.has_guidance
    assert schnell.model_sampling.describe()["kind"] == "discrete_flow"
    assert schnell.model_sampling.describe()["multiplier"] == 1.0
    calls = Calls(schnell.family.denoiser, monkeypatch)
    schnell.refine([job(1, negative=None)], FLOW)
    assert calls.calls[0]["guidance"] is None


def test_sd3_gets_sigma_times_1000_and_joint_text(sd3: Inpainter, monkeypatch) -> None:
    calls = Calls(sd3.family.denoiser, monkeypatch)
    sd3.refine([job(1)], SamplingSettings(steps=1, cfg=4.0, denoise=1.0))
    first = calls.calls[0]
    assert first["hidden_states"].shape[0] == 2, "cond and uncond rows in one call"
    assert float(first["timestep"][0]) == pytest.approx(1000.0, rel=1e-6), "σ_max = 1, multiplier 1000"
    assert first["encoder_hidden_states"].shape[1:] == (77 + 77, 4096), "CLIP-L+G window, then T5 (≥ 77)"
    assert sd3.model_sampling.describe() | {} == sd3.model_sampling.describe()
    assert sd3.model_sampling.describe()["kind"] == "discrete_flow" and sd3.model_sampling.describe()["shift"] == 3.0


def test_rows_of_different_text_lengths_run_as_separate_calls_in_row_order() -> None:
    short = TextConditioning(torch.zeros(1, 4, 8), torch.zeros(1, 3))
    long = TextConditioning(torch.ones(1, 6, 8), torch.ones(1, 3))
    rows = [FamilyRow(text, {"guidance": value}) for text, value in ((short, 1.0), (long, 2.0), (short, 3.0))]
    batches = rows_by_length(rows, [None] * 3, CPU, guidance=True)
    assert [batch.rows.tolist() for batch in batches] == [[0, 2], [1]]
    assert batches[0].context.shape == (2, 4, 8) and batches[0].guidance.tolist() == [1.0, 3.0]


def test_a_batched_flux_call_equals_each_row_alone(flux_dev: Inpainter) -> None:
    family = flux_dev.family
    short = family.encode_prompt(("a face",))
    long = family.encode_prompt((" ".join(["face"] * 300),))
    assert long.context.shape[1] > 256
    rows = [FamilyRow(short, {"guidance": 3.5}), FamilyRow(long, {"guidance": 1.0})]
    x = torch.randn(2, 16, 7, 9)  # odd: padded circularly, cut back
    timesteps = torch.tensor([0.7, 0.3])
    with torch.inference_mode():
        both = family.forward([], x, timesteps, family.batch_rows(rows, [None, None]))
        alone = [family.forward([], x[i : i + 1], timesteps[i : i + 1], family.batch_rows([rows[i]], [None]))
                 for i in range(2)]  # fmt: skip
    assert both.shape == (2, 16, 7, 9)
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], alone[i], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ text conditioning


def test_t5_tokens_have_no_start_token_end_with_eos_and_pad_with_zero_to_the_minimum(flux_dev: Inpainter) -> None:
    tokenizer = flux_dev.family.components.tokenizers["t5xxl"]
    ids, weights = t5_tokens(tokenizer, "a (face:1.5)", 256)
    plain = tokenizer("a face", add_special_tokens=False).input_ids
    assert ids[: len(plain)] == plain and ids[len(plain)] == 1 and set(ids[len(plain) + 1 :]) == {0}
    assert len(ids) == 256 and weights[: len(plain)] == [1.0] + [1.5] * (len(plain) - 1)
    long, _ = t5_tokens(tokenizer, " ".join(["face"] * 300), 256)
    assert len(long) == 301 and long[-1] == 1, "never cut: T5 takes the whole prompt"


def test_sd3_text_is_clip_l_and_g_padded_to_the_text_width_then_t5(sd3: Inpainter) -> None:
    parts = sd3.family.components
    encoded = sd3.family.encode_prompt(("a photo of a face",))
    clip_l, clip_g, t5 = (parts.text_encoders[name] for name in ("clip_l", "clip_g", "t5xxl"))
    with torch.inference_mode():
        ids_l = parts.tokenizers["clip_l"]("a photo of a face", padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids  # fmt: skip
        ids_g = parts.tokenizers["clip_g"]("a photo of a face", padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids  # fmt: skip
        out_l = clip_l(ids_l, output_hidden_states=True)
        out_g = clip_g(ids_g, output_hidden_states=True)
        ids_t5 = parts.tokenizers["t5xxl"]("a photo of a face", padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids  # fmt: skip
        t5_out = t5(ids_t5).last_hidden_state
    lg = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    expected = torch.cat([torch.nn.functional.pad(lg, (0, 4096 - lg.shape[-1])), t5_out], dim=1)
    torch.testing.assert_close(encoded.context, expected, rtol=1e-5, atol=1e-6)
    eos = int((ids_l[0] == parts.tokenizers["clip_l"].eos_token_id).int().argmax())
    pooled = torch.cat([out_l.last_hidden_state[:, eos], out_g.text_embeds], dim=-1)  # L unprojected, G projected
    torch.testing.assert_close(encoded.pooled, pooled, rtol=1e-5, atol=1e-6)
    chunks = sd3.family.encode_prompt(("a photo of a face", "smiling"))
    assert chunks.context.shape[1] == 2 * 154 and torch.equal(chunks.pooled, encoded.pooled)


def test_flux_text_is_t5_context_and_clip_l_pooled(flux_dev: Inpainter) -> None:
    parts = flux_dev.family.components
    encoded = flux_dev.family.encode_prompt(("a photo of a face",))
    with torch.inference_mode():
        ids = parts.tokenizers["t5xxl"]("a photo of a face", padding="max_length", max_length=256,
                                        return_tensors="pt").input_ids  # fmt: skip
        ids_l = parts.tokenizers["clip_l"]("a photo of a face", padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids  # fmt: skip
        t5_out = parts.text_encoders["t5xxl"](ids).last_hidden_state
        pooled = parts.text_encoders["clip_l"](ids_l).pooler_output
    torch.testing.assert_close(encoded.context, t5_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoded.pooled, pooled, rtol=1e-5, atol=1e-6)


def test_prompt_windows_counted_at_the_ingress_match_what_sd3_encodes(sd3: Inpainter) -> None:
    """``limits.max_prompt_tokens`` counts with the family's tokenizers: CLIP-L/G windows (77 tokens each
    in SD3's context) and T5's sequence in 75-token windows (pickled, as Ray sends them to the ingress)."""
    import pickle

    from deployments.inpainter import count_prompt_windows

    tokenizers = pickle.loads(pickle.dumps(sd3.prompt_tokenizers()))
    assert [length for _, length in tokenizers] == [77, 77, 77]
    for chunks in [(), ("a face",), ("word " * 75,), ("word " * 76,), ("a", "b BREAK c"), ("(smile:1.3) " * 40,)]:
        windows = count_prompt_windows(tokenizers, chunks)
        clip_windows = count_prompt_windows(tokenizers[:2], chunks)
        t5 = sd3.family.prompt_encoder.t5.tokenizer
        t5_length = sum(len(t5_tokens(t5, chunk, 77)[0]) for chunk in chunks or [""])
        assert windows >= clip_windows, chunks
        context = sd3.family.encode_prompt(tuple(chunks) or ("",)).context.shape[1]
        assert context == 77 * clip_windows + t5_length, chunks


# ------------------------------------------------------------------ basic guidance and refusals


def test_negative_null_runs_the_positive_only_and_equals_cfg_one(flux_dev: Inpainter, monkeypatch) -> None:
    calls = Calls(flux_dev.family.denoiser, monkeypatch)
    without = flux_dev.refine([job(3, negative=None)], FLOW)[0]
    rows = [call["hidden_states"].shape[0] for call in calls.calls]
    with_negative = flux_dev.refine([job(3, negative=("blurry",))], FLOW)[0]
    assert rows == [1, 1], "no negative row at any step"
    assert np.array_equal(without, with_negative), "cfg 1 never evaluates the negative either"


def test_what_a_family_cannot_honour_is_refused_naming_what_is_supported(flux_dev: Inpainter, sd3: Inpainter) -> None:
    with pytest.raises(ValueError, match="negative: null.*set cfg to 1"):
        flux_dev.payloads([job(1, negative=None)], SamplingSettings(steps=2, cfg=3.5))
    with pytest.raises(ValueError, match="negative: null has no negative for euler_cfg_pp"):
        flux_dev.payloads([job(1, negative=None)], SamplingSettings(steps=2, cfg=1.0, sampler_name="euler_cfg_pp"))
    with pytest.raises(ValueError, match="needs an inpainting checkpoint.*Flux.1 dev, not Flux.1 Fill"):
        flux_dev.validate_settings(SamplingSettings(inpaint_model=True))
    with pytest.raises(ValueError, match="LoRAs .*supported on SD 1.x/2.x/XL checkpoints only; this checkpoint is sd3"):
        sd3.payloads([job(1, loras=(("detail", 1.0, 1.0),))], FLOW)
    from facedetailer.controlnet import ControlHint

    hint = ControlHint("tile", 1.0, 0.0, 1.0, crop(64, 64))
    with pytest.raises(ValueError, match="controlnet is supported on SD 1.x/2.x/XL checkpoints only"):
        flux_dev.payloads([job(1, control=hint)], FLOW)
    with pytest.raises(ValueError, match="prediction and zsnr are SD/SDXL settings"):
        Inpainter(flux_dev.model, prediction="v_prediction", device="cpu")


# ------------------------------------------------------------------ SD v-prediction / zero terminal SNR


def test_v_prediction_and_zsnr_come_from_the_config_the_markers_or_the_checkpoint_settings(
    tiny_sdxl_vpred: dict, tiny_sd: dict
) -> None:
    folder = Inpainter(tiny_sdxl_vpred["pipeline"], device="cpu")
    single = Inpainter(tiny_sdxl_vpred["single_file"], single_file_config=tiny_sdxl_vpred["single_file_config"],
                       device="cpu")  # fmt: skip
    for inpainter in (folder, single):
        described = inpainter.model_sampling.describe()
        assert (described["kind"], described["prediction"], described["zsnr"]) == ("discrete", "v_prediction", True)
        assert float(inpainter.model_sampling.sigma_max) == pytest.approx(4518.8, rel=1e-3), "ComfyUI's zsnr table"
    jobs = [job(4)]
    settings = SamplingSettings(steps=3, cfg=5.0, denoise=0.7)
    assert np.array_equal(folder.refine(jobs, settings)[0], single.refine(jobs, settings)[0])
    overridden = Inpainter(tiny_sdxl_vpred["single_file"], single_file_config=tiny_sdxl_vpred["single_file_config"],
                           prediction="eps", zsnr=False, device="cpu")  # fmt: skip
    assert overridden.model_sampling.describe()["prediction"] == "eps"
    eps = Inpainter(tiny_sd["sdxl_pipeline"], prediction="v_prediction", zsnr=True, device="cpu")
    assert eps.model_sampling.describe()["prediction"] == "v_prediction" and eps.info()["prediction"] == "v_prediction"


# ------------------------------------------------------------------ detection and layouts


def _keys(names: list[str], shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], object]:
    return names, lambda key: shapes[key]


def test_detection_from_keys_follows_comfyui() -> None:
    ldm = "model.diffusion_model."
    flux = [f"{ldm}double_blocks.0.img_attn.norm.key_norm.scale", f"{ldm}img_in.weight"]
    flux += [f"{ldm}x{i}" for i in range(6)]
    guided = flux + [f"{ldm}guidance_in.in_layer.weight"]
    dev = detect_diffusion_model(*_keys(guided, {f"{ldm}img_in.weight": (3072, 64)}))
    assert (dev.family, dev.variant, dev.prefix) == ("flux", "dev", ldm)
    schnell = detect_diffusion_model(*_keys(flux, {f"{ldm}img_in.weight": (3072, 64)}))
    assert schnell.variant == "schnell"
    bare = [key.removeprefix(ldm) for key in flux] + ["guidance_in.in_layer.weight"]
    fill = detect_diffusion_model(*_keys(bare, {"img_in.weight": (3072, 384)}))
    assert (fill.variant, fill.prefix) == ("fill", ""), "a models/unet file has no prefix"
    with pytest.raises(UnsupportedModelError, match="128 input channels.*supported: Flux.1 dev and schnell"):
        detect_diffusion_model(*_keys(bare, {"img_in.weight": (3072, 512)}))
    with pytest.raises(UnsupportedModelError, match="Chroma"):
        detect_diffusion_model(*_keys(bare + ["distilled_guidance_layer.norms.0.scale"], {"img_in.weight": (3072, 64)}))
    sd3 = detect_diffusion_model(*_keys(["joint_blocks.0.context_block.attn.qkv.weight", "x_embedder.proj.weight"],
                                        {"x_embedder.proj.weight": (1536, 16, 2, 2)}))  # fmt: skip
    assert sd3.family == "sd3"
    unet = [f"{ldm}input_blocks.0.0.weight"] + [f"{ldm}y{i}" for i in range(6)]
    shapes = {f"{ldm}input_blocks.0.0.weight": (320, 4, 3, 3)}
    assert detect_diffusion_model(*_keys(unet, shapes)).family == "sd"
    sdxl = detect_diffusion_model(*_keys(unet + [f"{ldm}label_emb.0.0.weight", "v_pred", "ztsnr"], shapes))
    assert (sdxl.family, sdxl.facts["v_pred"], sdxl.facts["ztsnr"]) == ("sdxl", True, True)
    inpaint = detect_diffusion_model(*_keys(unet, {f"{ldm}input_blocks.0.0.weight": (320, 9, 3, 3)}))
    assert inpaint.variant == "inpainting"
    with pytest.raises(UnsupportedModelError, match="EDM"):
        detect_diffusion_model(*_keys(unet + ["edm_vpred.sigma_max"], shapes))
    diffusers_flux = ["x_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight"]
    assert detect_diffusion_model(*_keys(diffusers_flux, {"x_embedder.weight": (3072, 64)})).variant == "schnell"
    with pytest.raises(UnsupportedModelError, match="supported: sd, sdxl, sd3, flux"):
        detect_diffusion_model(*_keys(["some.weight"], {}))


def test_the_tiny_files_are_detected_from_their_headers(tiny_flux_dev: dict, tiny_sdxl_vpred: dict) -> None:
    split = detect_diffusion_model(*read_header(tiny_flux_dev["split_diffusion_model"])[:2])
    assert (split.family, split.variant, split.layout) == ("flux", "dev", "ldm")
    single = detect_diffusion_model(*read_header(tiny_sdxl_vpred["single_file"])[:2])
    assert (single.family, single.facts["v_pred"], single.facts["ztsnr"]) == ("sdxl", True, True)


def test_flux_key_conversion_round_trips_and_matches_diffusers_at_full_width(flux_dev: Inpainter) -> None:
    state = flux_dev.family.denoiser.state_dict()
    original = flux_from_diffusers(state)
    assert "double_blocks.0.img_attn.qkv.weight" in original and "single_blocks.1.linear1.bias" in original
    back = flux_to_diffusers({"model.diffusion_model." + key: value for key, value in original.items()})
    assert back.keys() == state.keys() and all(torch.equal(back[key], state[key]) for key in state)
    # diffusers' own converter (written for the full-width model) on meta tensors of Flux.1 dev's shapes
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    full = {key: torch.empty(_full_width_shape(key, value.shape), device="meta") for key, value in original.items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(full))
    ours = flux_to_diffusers(full)
    assert theirs.keys() == ours.keys()
    assert all(theirs[key].shape == ours[key].shape for key in ours)


def _full_width_shape(key: str, shape: torch.Size) -> tuple[int, ...]:
    """The tiny Flux's shapes at Flux.1's width: every multiple of the tiny width (32) × 96 → 3072, MLP 4×.

    diffusers' converter only splits and swaps along those axes, so the key and shape maps can be
    compared without allocating a full-size model.
    """
    return tuple(size * (3072 // 32) if size % 32 == 0 else size for size in shape)


def test_the_split_layout_loads_the_same_weights_as_the_folder(tiny_flux_dev: dict, flux_dev: Inpainter) -> None:
    split = load_family(
        CheckpointSource(
            diffusion_model=tiny_flux_dev["split_diffusion_model"],
            text_encoders={"clip_l": tiny_flux_dev["split_clip_l"], "t5xxl": tiny_flux_dev["split_t5xxl"]},
            vae=tiny_flux_dev["split_vae"],
            config=tiny_flux_dev["pipeline"],
        ),
        device=CPU,
        dtype=torch.float32,
    )
    folder = flux_dev.family
    assert split.format == "split" and split.variant == "dev"
    pairs = [(split.denoiser, folder.denoiser), (split.vae, folder.vae)]
    encoders = split.components.text_encoders, folder.components.text_encoders
    pairs += [(encoders[0][name], encoders[1][name]) for name in ("t5xxl", "clip_l")]
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert split.describe()["weight_dtype"] == "float32"
    with pytest.raises(ValueError, match="needs single_file_config"):
        load_family(CheckpointSource(diffusion_model=tiny_flux_dev["split_diffusion_model"],
                                     vae=tiny_flux_dev["split_vae"]), device=CPU, dtype=torch.float32)  # fmt: skip


def test_families_describe_themselves(flux_dev: Inpainter, sd3: Inpainter) -> None:
    info = flux_dev.info()
    assert (info["family"], info["variant"], info["prediction"], info["guidance"]) == ("flux", "dev", "const", True)
    assert info["model_sampling"]["kind"] == "flux" and info["latent_channels"] == 16
    assert info["latent_scale_factor"] == FLUX_LATENT.scale_factor
    assert not info["model"].startswith("/"), "no absolute server path"
    assert sd3.info()["text_encoders"] == ["clip_g", "clip_l", "t5xxl"]


def test_an_all_in_one_flux_file_loads_like_the_folder(tiny_flux_dev: dict, flux_dev: Inpainter, tmp_path) -> None:
    """ComfyUI's checkpoint layout: model.diffusion_model., vae., text_encoders.<name>.transformer. prefixes."""
    from safetensors.torch import load_file, save_file

    prefixes = {
        "split_diffusion_model": "model.diffusion_model.",
        "split_vae": "vae.",
        "split_clip_l": "text_encoders.clip_l.transformer.",
        "split_t5xxl": "text_encoders.t5xxl.transformer.",
    }
    state = {prefix + key: value for part, prefix in prefixes.items()
             for key, value in load_file(tiny_flux_dev[part]).items()}  # fmt: skip
    path = tmp_path / "flux1-tiny-dev-aio.safetensors"
    save_file(state, str(path))
    source = CheckpointSource(model=str(path), config=tiny_flux_dev["pipeline"])
    family = load_family(source, device=CPU, dtype=torch.float32)
    assert (family.name, family.variant, family.format) == ("flux", "dev", "single_file")
    folder = flux_dev.family
    pairs = [(family.denoiser, folder.denoiser), (family.vae, folder.vae)]
    pairs += [(family.components.text_encoders[name], folder.components.text_encoders[name]) for name in ("t5xxl",)]
    for ours, theirs in pairs:
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in b)


def test_checkpoints_are_described_from_their_headers_without_server_paths(tiny_flux_fill: dict, tmp_path) -> None:
    from deployments.families.loading import describe_checkpoint

    fill = describe_checkpoint({"model": tiny_flux_fill["pipeline"]})
    assert (fill["family"], fill["variant"], fill["format"], fill["weight_dtype"]) == ("flux", "fill", "diffusers",
                                                                                        "float32")  # fmt: skip
    assert fill["model_sampling"] == {"kind": "flux", "prediction": "const", "shift": 1.15}
    assert fill["source"]["model"] == "flux-fill", "a local path by its name only"
    shifted = describe_checkpoint({"model": tiny_flux_fill["pipeline"], "shift": 2.0})
    assert shifted["model_sampling"]["shift"] == 2.0
    missing = describe_checkpoint({"model": str(tmp_path / "nowhere" / "model.safetensors")})
    assert "model.safetensors" in missing["error"] and str(tmp_path) not in missing["error"]
