"""Tiny random-weight checkpoints of the model families beyond SD 1.x, saved as users have them.

Every part is diffusers' or transformers' own class at toy sizes, so the inpainter loads them with
its production code (:mod:`deployments.families.loading`):

- ``sdxl_vpred``: an SDXL folder whose scheduler config says ``v_prediction`` and
  ``rescale_betas_zero_snr`` (``pipeline``), and the same weights as one original-layout single
  file carrying ComfyUI's ``v_pred`` / ``ztsnr`` marker keys (``single_file``), read with an
  *eps* config folder (``single_file_config``) so only the markers make it v-prediction;
- ``sd3``: an SD3.5-style folder (MMDiT with RMS q/k norms, CLIP-L, CLIP-G, T5, 16-channel VAE);
- ``flux_dev`` / ``flux_schnell`` / ``flux_fill``: Flux.1 folders (guidance embedding or not;
  Fill's 384 input features); ``flux_dev`` also in ComfyUI's split layout (``split``: the
  transformer under Black Forest Labs' names as in ``models/unet``, ``clip_l`` and ``t5xxl``
  files as in ``models/text_encoders``, the VAE as in ``models/vae``: ``split_diffusion_model``,
  ``split_clip_l``, ``split_t5xxl``, ``split_vae``; the ``pipeline`` folder gives the architecture
  and tokenizers).

Sizes follow the rules ComfyUI's model detection assumes where it can (an MMDiT's width is 64 ×
its depth with one head per layer), so ComfyUI's own modules can be built on the same weights
(``benchmarks/family_parity.py``). SD3's T5 is 4096 wide because ComfyUI's SD3 text code pads
the CLIP part to 4096 before joining T5's; Flux's T5 is as narrow as its transformer's text input.
Random weights make noise, not faces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deployments.testing.tiny_sd import (
    SCHEDULER_CONFIG,
    _ldm_unet_state_dict,
    _ldm_vae_state_dict,
    _text_encoder_config,
    write_clip_tokenizer,
)
from deployments.testing.tiny_t5 import tiny_t5_encoder, write_t5_tokenizer

SEED = 18
SDXL_CLIP_G_WIDTH = 48
SD3_DEPTH = 2  # MMDiT: width 64·depth, depth heads of 64
SD3_T5_WIDTH = 4096
FLUX_T5_WIDTH = 64
FLUX_HEADS, FLUX_HEAD_DIM = 2, 16
FLUX_ROPE_AXES = (4, 6, 6)  # sums to the head size, as (16, 56, 56) does for 128


def _vae16(scaling_factor: float, shift_factor: float) -> Any:
    """The SD3/Flux VAE layout (16 latent channels, no quant convs) at toy width; 8× downsampling."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=16,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def _clip(*, projection: bool, act: str = "quick_gelu", layers: int = 2) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = _text_encoder_config(projection=projection)
    config.hidden_act = act
    config.num_hidden_layers = layers
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _tokenizers(directory: Path) -> dict[str, Path]:
    return {
        "clip_l": write_clip_tokenizer(directory / "tokenizer-clip-l"),
        "clip_g": write_clip_tokenizer(directory / "tokenizer-clip-g", pad_token="!"),
        "t5xxl": write_t5_tokenizer(directory / "tokenizer-t5"),
    }


# ---------------------------------------------------------------------------- SDXL v-prediction


OPEN_CLIP_NAMES = (
    ("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
)  # fmt: skip


def _open_clip_state_dict(encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` under OpenCLIP's names (SDXL single files' second text encoder)."""
    state = {key.removeprefix("text_model."): value for key, value in encoder.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
        prefix + "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    layers = encoder.config.num_hidden_layers
    for i in range(layers):
        old, new = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{new}attn.in_proj_{leaf}"] = torch.cat(
                [state[f"{old}self_attn.{part}_proj.{leaf}"] for part in ("q", "k", "v")]
            )
            for ours, theirs in OPEN_CLIP_NAMES:
                out[f"{new}{theirs}.{leaf}"] = state[f"{old}{ours}.{leaf}"]
    return out


def export_sdxl_single_file(pipeline: Any, path: Path, markers: dict[str, torch.Tensor]) -> Path:
    """An SDXL pipeline as one original-layout (SGM) checkpoint, plus marker keys (ComfyUI's ``v_pred``…)."""
    from safetensors.torch import save_file

    state = _ldm_unet_state_dict(pipeline.unet)
    state.update(_ldm_vae_state_dict(pipeline.vae))
    for key, value in pipeline.text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else "text_model." + key
        state["conditioner.embedders.0.transformer." + name] = value
    state.update(_open_clip_state_dict(pipeline.text_encoder_2, "conditioner.embedders.1.model."))
    state.update(markers)
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def _sdxl_vpred_pipeline(tokenizer_dir: Path, tokenizer_2_dir: Path) -> Any:
    """The tiny SDXL with a CLIP-G wider than its CLIP-L (48 vs 32), as the real ones differ (1280 vs 768):
    diffusers' single-file loader tells the two encoders apart by width."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from deployments.testing.tiny_sd import _unet, _vae

    clip_g = _text_encoder_config(projection=True)
    clip_g.hidden_size = clip_g.projection_dim = SDXL_CLIP_G_WIDTH
    clip_g.hidden_act = "gelu"
    unet = _unet(sdxl=True)
    unet_config = dict(unet.config)
    unet_config.update(
        cross_attention_dim=32 + SDXL_CLIP_G_WIDTH,
        projection_class_embeddings_input_dim=SDXL_CLIP_G_WIDTH + 6 * int(unet_config["addition_time_embed_dim"]),
    )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(projection=False)),
        text_encoder_2=CLIPTextModelWithProjection(clip_g),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_2_dir),
        unet=type(unet).from_config(unet_config),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
    )


def build_tiny_sdxl_vpred(directory: Path) -> dict[str, str]:
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_clip_tokenizer(directory / "clip-tokenizer")
    tokenizer_2_dir = write_clip_tokenizer(directory / "clip-tokenizer-2", pad_token="!")
    torch.manual_seed(SEED)
    pipeline = _sdxl_vpred_pipeline(tokenizer_dir, tokenizer_2_dir)
    pipeline.save_pretrained(directory / "sdxl-eps-config", safe_serialization=True)  # the single file's config
    scheduler = dict(SCHEDULER_CONFIG, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    pipeline.scheduler = type(pipeline.scheduler).from_config(scheduler)
    pipeline.save_pretrained(directory / "sdxl-vpred", safe_serialization=True)
    markers = {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}
    single = export_sdxl_single_file(pipeline, directory / "tiny-sdxl-vpred.safetensors", markers)
    return {
        "pipeline": str(directory / "sdxl-vpred"),
        "single_file": str(single),
        "single_file_config": str(directory / "sdxl-eps-config"),
    }


# ---------------------------------------------------------------------------- SD3


def _sd3_pipeline(tokenizers: dict[str, Path]) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5Tokenizer

    # 3 layers: ComfyUI reads the penultimate one only of an encoder deeper than 2
    clip_l, clip_g = _clip(projection=True, layers=3), _clip(projection=True, act="gelu", layers=3)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=SD3_DEPTH,
        attention_head_dim=64,
        num_attention_heads=SD3_DEPTH,
        joint_attention_dim=SD3_T5_WIDTH,
        caption_projection_dim=64 * SD3_DEPTH,
        pooled_projection_dim=clip_l.config.hidden_size + clip_g.config.projection_dim,
        out_channels=16,
        pos_embed_max_size=96,
        qk_norm="rms_norm",  # SD3.5's q/k normalisation
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae16(1.5305, 0.0609),
        text_encoder=clip_l,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers["clip_l"]),
        text_encoder_2=clip_g,
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizers["clip_g"]),
        text_encoder_3=tiny_t5_encoder(tokenizers["t5xxl"], SD3_T5_WIDTH),
        tokenizer_3=T5Tokenizer.from_pretrained(tokenizers["t5xxl"]),
    )


def build_tiny_sd3(directory: Path) -> dict[str, str]:
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizers = _tokenizers(directory)
    torch.manual_seed(SEED + 1)
    _sd3_pipeline(tokenizers).save_pretrained(directory / "sd3", safe_serialization=True)
    return {"pipeline": str(directory / "sd3")}


# ---------------------------------------------------------------------------- Flux


def _flux_pipeline(tokenizers: dict[str, Path], variant: str) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Tokenizer

    clip_l = _clip(projection=False)
    fill = variant == "fill"
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=(16 + 16 + 64) * 4 if fill else 64,
        out_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=FLUX_HEAD_DIM,
        num_attention_heads=FLUX_HEADS,
        joint_attention_dim=FLUX_T5_WIDTH,
        pooled_projection_dim=clip_l.config.hidden_size,
        guidance_embeds=variant != "schnell",
        axes_dims_rope=FLUX_ROPE_AXES,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=variant != "schnell", base_shift=0.5, max_shift=1.15
    )
    pipeline_class = FluxFillPipeline if fill else FluxPipeline
    return pipeline_class(
        scheduler=scheduler,
        vae=_vae16(0.3611, 0.1159),
        text_encoder=clip_l,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizers["clip_l"]),
        text_encoder_2=tiny_t5_encoder(tokenizers["t5xxl"], FLUX_T5_WIDTH),
        tokenizer_2=T5Tokenizer.from_pretrained(tokenizers["t5xxl"]),
        transformer=transformer,
    )


def export_flux_split(pipeline: Any, directory: Path) -> dict[str, str]:
    """ComfyUI's split layout of a Flux pipeline: models/unet, models/text_encoders (clip_l, t5xxl), models/vae."""
    from safetensors.torch import save_file

    from deployments.families.flux_keys import flux_from_diffusers

    directory.mkdir(parents=True, exist_ok=True)

    def save(state: dict[str, torch.Tensor], name: str) -> str:
        path = directory / name
        save_file({key: value.detach().clone().contiguous() for key, value in state.items()}, str(path))
        return str(path)

    clip = {key if key.startswith("text_model.") else "text_model." + key: value
            for key, value in pipeline.text_encoder.state_dict().items()}  # fmt: skip
    vae = {key.removeprefix("first_stage_model."): value for key, value in _ldm_vae_state_dict(pipeline.vae).items()}
    return {
        "diffusion_model": save(flux_from_diffusers(pipeline.transformer.state_dict()), "flux1-tiny-dev.safetensors"),
        "clip_l": save(clip, "clip_l.safetensors"),
        "t5xxl": save(dict(pipeline.text_encoder_2.state_dict()), "t5xxl_tiny.safetensors"),
        "vae": save(vae, "ae.safetensors"),
    }


def _build_flux(directory: Path, variant: str, seed: int) -> dict[str, Any]:
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizers = _tokenizers(directory)
    torch.manual_seed(seed)
    pipeline = _flux_pipeline(tokenizers, variant)
    pipeline.save_pretrained(directory / f"flux-{variant}", safe_serialization=True)
    paths: dict[str, Any] = {"pipeline": str(directory / f"flux-{variant}")}
    if variant == "dev":  # tiny://flux_dev/split_diffusion_model, …/split_clip_l, …/split_t5xxl, …/split_vae
        paths.update({f"split_{part}": path for part, path in export_flux_split(pipeline, directory / "split").items()})
    return paths


def build_tiny_flux_dev(directory: Path) -> dict[str, Any]:
    return _build_flux(directory, "dev", SEED + 2)


def build_tiny_flux_schnell(directory: Path) -> dict[str, Any]:
    return _build_flux(directory, "schnell", SEED + 3)


def build_tiny_flux_fill(directory: Path) -> dict[str, Any]:
    return _build_flux(directory, "fill", SEED + 4)
