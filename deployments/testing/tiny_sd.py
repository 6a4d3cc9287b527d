"""Tiny Stable Diffusion pipelines with random weights, saved the way real checkpoints come.

Every component has the real architecture (``UNet2DConditionModel``, ``AutoencoderKL``,
``CLIPTextModel``, a real CLIP BPE tokenizer) at toy sizes, so :class:`deployments.inpainter.Inpainter`
loads them with its production code:

- ``pipeline``: an SD 1.x-style diffusers folder (4-channel UNet);
- ``inpaint_pipeline``: the same with a 9-channel inpainting UNet;
- ``sdxl_pipeline``: an SDXL-style folder (two text encoders, ``text_time`` added conditions);
- ``single_file``: ``pipeline`` exported as one original-layout (LDM) ``.safetensors`` checkpoint,
  with ``single_file_config`` (the ``pipeline`` folder) as the config that diffusers'
  ``from_single_file`` needs offline.

The VAE downsamples by 8 like the real one, so crops are padded to multiples of 8 exactly as in
production. Random weights produce noise, not faces: tests check shapes, determinism and the
sampling arithmetic, never image quality.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch

SEED = 0
TOKENIZER_MAX_LENGTH = 77
# Beta schedule of SD 1.x/2.x/XL; stored in a PNDM config as the SD 1.5 repository has it, so
# the inpainter's "build every sampler from the checkpoint's scheduler config" path is exercised.
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table (every byte gets a visible symbol)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def write_clip_tokenizer(directory: Path, *, pad_token: str = "<|endoftext|>") -> Path:
    """Convert open_clip's ``bpe_simple_vocab_16e6.txt.gz`` into a Hugging Face CLIP tokenizer folder.

    The vocabulary is built exactly as open_clip's SimpleTokenizer builds it (256 byte symbols,
    the same with ``</w>``, 48,894 merges, then the two special tokens: 49,408 entries), which is
    also the vocabulary of ``openai/clip-vit-large-patch14``. SD 1.x pads with ``<|endoftext|>``,
    SDXL's second tokenizer with ``!``.
    """
    from deployments.testing.assets import clip_bpe_vocab

    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(clip_bpe_vocab(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [symbol + "</w>" for symbol in symbols]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TOKENIZER_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def _text_encoder_config(*, projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=32,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if not projection else 0,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Four levels, so the latent grid is 1/8 of the image as with the real SD VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        mid_block_add_attention=False,  # same reason: no attention over the whole latent
    )


def _unet(*, in_channels: int = 4, sdxl: bool = False) -> Any:
    from diffusers import UNet2DConditionModel

    extra: dict[str, Any] = {}
    if sdxl:
        # SDXL's added conditions: pooled text embedding + 6 Fourier-embedded size/crop ids.
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
            "transformer_layers_per_block": 1,
        }
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        # Attention only at the lower level: full-resolution self-attention over a 512-pixel
        # crop's 64×64 latent would dominate CPU time (real SD has it; the tiny model needn't).
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64 if sdxl else 32,
        attention_head_dim=8,
        norm_num_groups=32,
        **extra,
    )


def _sd_pipeline(tokenizer_dir: Path, *, in_channels: int) -> Any:
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    pipeline_class = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    return pipeline_class(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(projection=False)),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=_unet(in_channels=in_channels),
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_pipeline(tokenizer_dir: Path, tokenizer_2_dir: Path) -> Any:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(projection=False)),
        text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(projection=True)),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_2_dir),
        unet=_unet(sdxl=True),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
    )


def _ldm_unet_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    """The UNet's weights under the original (LDM ``openaimodel``) names that single-file loaders read."""
    from deployments.inpainter_loading import ldm_unet_renames, to_ldm_unet_name

    renames = ldm_unet_renames(unet.config)
    converted: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        name = to_ldm_unet_name(key, renames)
        if name is None:
            raise KeyError(f"no LDM name for UNet weight {key}")
        converted["model.diffusion_model." + name] = value
    return converted


def _ldm_vae_state_dict(vae: Any) -> dict[str, torch.Tensor]:
    """The VAE's weights under LDM names (``encoder.down.{i}.block``, reversed ``decoder.up``, conv attention)."""
    levels = len(vae.config.block_out_channels)
    renames: dict[str, str] = {
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for side in ("encoder", "decoder"):
        renames[f"{side}.mid_block.resnets.0"] = f"{side}.mid.block_1"
        renames[f"{side}.mid_block.resnets.1"] = f"{side}.mid.block_2"
        renames[f"{side}.mid_block.attentions.0"] = f"{side}.mid.attn_1"
    for level in range(levels):
        renames[f"encoder.down_blocks.{level}.resnets"] = f"encoder.down.{level}.block"
        renames[f"encoder.down_blocks.{level}.downsamplers.0"] = f"encoder.down.{level}.downsample"
        renames[f"decoder.up_blocks.{level}.resnets"] = f"decoder.up.{levels - 1 - level}.block"
        renames[f"decoder.up_blocks.{level}.upsamplers.0"] = f"decoder.up.{levels - 1 - level}.upsample"
    attention_parts = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    converted: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        prefix = max((name for name in renames if key.startswith(name + ".")), key=len, default=None)
        new_key = key if prefix is None else renames[prefix] + key[len(prefix) :]
        new_key = new_key.replace("conv_shortcut", "nin_shortcut")
        if prefix is not None and prefix.endswith("attentions.0"):
            part = max((name for name in attention_parts if key[len(prefix) + 1 :].startswith(name + ".")), key=len)
            new_key = f"{renames[prefix]}.{attention_parts[part]}.{key.rsplit('.', 1)[1]}"
            if value.ndim == 2:  # LDM's attention projections are 1×1 convolutions
                value = value[:, :, None, None]
        converted["first_stage_model." + new_key] = value
    return converted


def export_single_file(pipeline: Any, path: Path) -> Path:
    """Write an SD 1.x pipeline as one original-layout checkpoint (what A1111/ComfyUI users download)."""
    from safetensors.torch import save_file

    state = _ldm_unet_state_dict(pipeline.unet)
    state.update(_ldm_vae_state_dict(pipeline.vae))
    for key, value in pipeline.text_encoder.state_dict().items():
        # Original checkpoints name CLIP's weights "text_model.*" (transformers 5 drops the prefix).
        name = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + name] = value
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def build_tiny_sd(directory: Path) -> dict[str, str]:
    """Build every tiny SD variant into ``directory``; return their absolute paths."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_clip_tokenizer(directory / "clip-tokenizer")
    tokenizer_2_dir = write_clip_tokenizer(directory / "clip-tokenizer-2", pad_token="!")
    torch.manual_seed(SEED)
    paths: dict[str, str] = {"tokenizer": str(tokenizer_dir)}
    pipeline = _sd_pipeline(tokenizer_dir, in_channels=4)
    pipeline.save_pretrained(directory / "sd15", safe_serialization=True)
    paths["pipeline"] = str(directory / "sd15")
    paths["single_file"] = str(export_single_file(pipeline, directory / "tiny-sd15.safetensors"))
    paths["single_file_config"] = paths["pipeline"]
    _sd_pipeline(tokenizer_dir, in_channels=9).save_pretrained(directory / "sd15-inpainting", safe_serialization=True)
    paths["inpaint_pipeline"] = str(directory / "sd15-inpainting")
    _sdxl_pipeline(tokenizer_dir, tokenizer_2_dir).save_pretrained(directory / "sdxl", safe_serialization=True)
    paths["sdxl_pipeline"] = str(directory / "sdxl")
    return paths


def build_tiny_sd_alt(directory: Path) -> dict[str, str]:
    """A second SD 1.x folder, same architecture, other random weights: a second checkpoint to serve."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_clip_tokenizer(directory / "clip-tokenizer")
    torch.manual_seed(SEED + 1)
    _sd_pipeline(tokenizer_dir, in_channels=4).save_pretrained(directory / "sd15-alt", safe_serialization=True)
    return {"pipeline": str(directory / "sd15-alt")}
