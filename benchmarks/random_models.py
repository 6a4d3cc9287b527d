"""Full-size SD 1.5 and SDXL with random weights, built locally from their real configs (no downloads).

The benchmarks need the real architectures' cost, not their pictures: the configs below are the
published ones (``runwayml/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-xl-base-1.0``
``config.json`` files, written out here), the weights are seeded random initialisations. Each
model is saved the two ways checkpoints come: a diffusers folder (what the service loads) and,
for SD 1.5, one original-layout (LDM) ``.safetensors`` file (what ComfyUI's CheckpointLoader
loads), with the same weights.

    python benchmarks/random_models.py sd15 [--root .cache/bench]     # ~4 GB each form

A finished build leaves ``manifest.json`` (written last), so an interrupted one is redone.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_ROOT = REPO / ".cache" / "bench"
BUILD_VERSION = 1
SEED = 0

SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}

SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

CLIP_L: dict[str, Any] = {  # openai/clip-vit-large-patch14's text tower (SD 1.x, SDXL's first encoder)
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SDXL_VAE: dict[str, Any] = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

CLIP_G: dict[str, Any] = {  # laion CLIP-ViT-bigG-14's text tower (SDXL's second encoder)
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 0,
}


def _text_encoder(config: dict[str, Any], *, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_class(CLIPTextConfig(**config))


def sd15_pipeline(tokenizer_dir: Path) -> Any:
    """SD 1.5 (UNet 860M, VAE 84M, CLIP-L 123M parameters), seeded random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(SEED)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**SD_VAE),
        text_encoder=_text_encoder(CLIP_L, projection=False),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(tokenizer_dir: Path, tokenizer_2_dir: Path) -> Any:
    """SDXL base (UNet 2.6B, VAE 84M, CLIP-L 123M + CLIP-G 695M parameters), seeded random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(SEED)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SDXL_VAE),
        text_encoder=_text_encoder(CLIP_L, projection=False),
        text_encoder_2=_text_encoder(CLIP_G, projection=True),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_2_dir),
        unet=UNet2DConditionModel(**SDXL_UNET),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
    )


def _build(name: str, staging: Path) -> dict[str, str]:
    from deployments.testing.tiny_sd import export_single_file, write_clip_tokenizer

    tokenizer = write_clip_tokenizer(staging / "clip-tokenizer")
    if name == "sd15":
        pipeline = sd15_pipeline(tokenizer)
        pipeline.save_pretrained(staging / "sd15", safe_serialization=True)
        single = export_single_file(pipeline, staging / "sd15-random.safetensors")
        return {"pipeline": "sd15", "single_file": single.name}
    if name == "sdxl":
        tokenizer_2 = write_clip_tokenizer(staging / "clip-tokenizer-2", pad_token="!")
        sdxl_pipeline(tokenizer, tokenizer_2).save_pretrained(staging / "sdxl", safe_serialization=True)
        return {"pipeline": "sdxl"}
    raise ValueError(f"unknown model {name!r}: sd15 or sdxl")


def build(name: str, root: Path = DEFAULT_ROOT) -> dict[str, str]:
    """Build ``name`` (sd15, sdxl) under ``root/name`` once; return absolute paths of its parts."""
    directory = Path(root).resolve() / name
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = directory / "manifest.json"
        if manifest.is_file():
            stored = json.loads(manifest.read_text())
            if stored.get("version") == BUILD_VERSION:
                return {key: str(directory / value) for key, value in stored["parts"].items()}
        staging = directory.with_name(f".{name}-building")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)
        staging.mkdir(parents=True)
        parts = _build(name, staging)
        (staging / "manifest.json").write_text(json.dumps({"version": BUILD_VERSION, "parts": parts}))
        staging.rename(directory)
        return {key: str(directory / value) for key, value in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", choices=("sd15", "sdxl"))
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    options = parser.parse_args()
    for name in options.models:
        print(json.dumps({name: build(name, options.root)}))


if __name__ == "__main__":
    main()
