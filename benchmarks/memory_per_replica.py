"""Bytes of weights an inpainter replica (and the shared text encoder) keeps resident, by family and weight dtype.

Two parts, each saying what it measures:

1. **Full-size architectures, counted** (``--full``, the default): each family's real
   architecture (SD 1.5, SDXL, SD3.5 medium and large, Flux.1 dev; their VAEs; CLIP-L, CLIP-G,
   T5-XXL) is built with diffusers' and transformers' own classes and the published configs on
   the *meta* device (no weights, no memory), and the bytes it would hold are counted per storage:
   ``float32``, ``float16``; ``float8_e4m3fn`` by running the loader's own
   :func:`~deployments.families.weight_storage.keep_float8` on the meta model (blocks float8,
   the rest upcast to float16: exactly what loading an fp8 file keeps); GGUF ``Q8_0`` / ``Q4_0``
   by the rule diffusers' GGUF loader follows (every ``nn.Linear`` weight whose rows
   fit the quant blocks at the format's bytes per block — as city96's files quantise them —
   everything else float16). These are parameter-count arithmetic on the real architectures,
   not allocations: activations, the CUDA context and the allocator's slack come on top.
2. **Tiny models, loaded** (``--tiny``): the tiny Flux.1 dev split layout loaded by the real
   :class:`~deployments.inpainter.Inpainter` from float32, float8 and GGUF files, with and without
   the shared text encoder; the bytes are those of the tensors the loaded replica holds
   (``info()["weight_bytes"]``), i.e. real allocations, on a model too small to say anything
   about real sizes — it checks that the loader keeps what part 1 counts.

    .venv/bin/python benchmarks/memory_per_replica.py            # both, Markdown tables
    .venv/bin/python benchmarks/memory_per_replica.py --json /tmp/memory.json

No network; part 2 needs the tiny models (``FACEDETAILER_TINY_MODELS``, built by the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1e9
# values per block, bytes per block (Q4_K is 4.5 bits per value too, in blocks of 256: the same where rows fit)
GGUF_BYTES = {"Q8_0": (32, 34), "Q4_0": (32, 18)}


# ---------------------------------------------------------------------------- full-size architectures


def _unet_sd15() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def _unet_sdxl() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def _sd35(large: bool) -> Any:
    from diffusers import SD3Transformer2DModel

    if large:
        return SD3Transformer2DModel(
            sample_size=128, num_layers=38, attention_head_dim=64, num_attention_heads=38,
            joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
            pos_embed_max_size=192, qk_norm="rms_norm",
        )  # fmt: skip
    return SD3Transformer2DModel(
        sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
    )  # fmt: skip


def _flux_dev() -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(guidance_embeds=True)  # diffusers' defaults are Flux.1's architecture


def _vae(latent_channels: int) -> Any:
    from diffusers import AutoencoderKL

    flow = latent_channels == 16
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=latent_channels,
        use_quant_conv=not flow,
        use_post_quant_conv=not flow,
    )


def _clip_l() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, projection_dim=768))  # fmt: skip


def _clip_g() -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, hidden_act="gelu")  # fmt: skip
    return CLIPTextModelWithProjection(config)


def _t5_xxl() -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False))  # fmt: skip


# family → (denoiser, vae, {text encoder: builder}); fp8/GGUF apply to the denoiser and T5 (what users download so)
FAMILIES: dict[str, tuple[Callable[[], Any], Callable[[], Any], dict[str, Callable[[], Any]]]] = {
    "SD 1.5": (_unet_sd15, lambda: _vae(4), {"clip_l": _clip_l}),
    "SDXL": (_unet_sdxl, lambda: _vae(4), {"clip_l": _clip_l, "clip_g": _clip_g}),
    "SD3.5 medium": (lambda: _sd35(False), lambda: _vae(16), {"clip_l": _clip_l, "clip_g": _clip_g, "t5xxl": _t5_xxl}),
    "SD3.5 large": (lambda: _sd35(True), lambda: _vae(16), {"clip_l": _clip_l, "clip_g": _clip_g, "t5xxl": _t5_xxl}),
    "Flux.1 dev": (_flux_dev, lambda: _vae(16), {"clip_l": _clip_l, "t5xxl": _t5_xxl}),
}


def _meta(build: Callable[[], Any]) -> Any:
    with torch.device("meta"):
        return build()


def _bytes(model: Any) -> int:
    from deployments.families.weight_storage import resident_bytes

    return resident_bytes([model])


def stored_bytes(build: Callable[[], Any], storage: str) -> int:
    """Bytes ``build()``'s weights occupy when held as ``storage`` (meta device: counted, not allocated)."""
    model = _meta(build)
    if storage in ("float32", "float16"):
        return _bytes(model.to(getattr(torch, storage)))
    if storage == "float8_e4m3fn":
        from deployments.families.weight_storage import keep_float8

        model = model.to(torch.float8_e4m3fn)  # as an fp8 file is read: every tensor float8
        if not keep_float8(model, torch.float16):  # no block classes: all upcast (never the case here)
            model = model.to(torch.float16)
        return _bytes(model)
    values, block_bytes = GGUF_BYTES[storage.removeprefix("gguf:")]
    total = 0
    quantised: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and weight is not None and weight.shape[-1] % values == 0:
            quantised.add(id(weight))
            total += weight.numel() // values * block_bytes
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in quantised:
            total += tensor.numel() * (2 if tensor.is_floating_point() else tensor.element_size())
    return total


def full_size(storages: list[str]) -> list[dict[str, Any]]:
    rows = []
    for family, (denoiser, vae, encoders) in FAMILIES.items():
        vae_bytes = stored_bytes(vae, "float16")
        clip_bytes = sum(stored_bytes(build, "float16") for name, build in encoders.items() if name != "t5xxl")
        for storage in storages:
            if family in ("SD 1.5", "SDXL") and storage not in ("float32", "float16"):
                continue  # SD/SDXL run float16 files (their fp8/GGUF files are not loaded by this path)
            denoiser_bytes = stored_bytes(denoiser, storage)
            t5_storage = storage if storage in ("float32", "float8_e4m3fn") else "float16"  # T5: fp16 or fp8 files
            t5_bytes = stored_bytes(encoders["t5xxl"], t5_storage) if "t5xxl" in encoders else 0
            if storage == "float32":
                vae_row, clip_row = stored_bytes(vae, "float32"), sum(
                    stored_bytes(build, "float32") for name, build in encoders.items() if name != "t5xxl"
                )  # fmt: skip
                t5_bytes = stored_bytes(encoders["t5xxl"], "float32") if "t5xxl" in encoders else 0
            else:
                vae_row, clip_row = vae_bytes, clip_bytes
            rows.append({
                "family": family, "storage": storage, "t5_storage": t5_storage if "t5xxl" in encoders else None,
                "denoiser": denoiser_bytes, "vae": vae_row, "clip": clip_row, "t5xxl": t5_bytes,
                "replica_local_text": denoiser_bytes + vae_row + clip_row + t5_bytes,
                "replica_shared_text": denoiser_bytes + vae_row + (0 if "t5xxl" in encoders else clip_row),
                "text_encoder_deployment": (clip_row + t5_bytes) if "t5xxl" in encoders else 0,
            })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- tiny models, loaded


def tiny_loaded() -> list[dict[str, Any]]:
    from deployments.inpainter import Inpainter
    from deployments.testing.tiny_quantized import export_float8, export_gguf
    from deployments.text_encoder import TextEncoder, TextEncoderClient
    from deployments.weights import resolve_weights

    def ref(name: str) -> str:
        return str(resolve_weights(f"tiny://flux_dev/{name}"))

    directory = Path(tempfile.mkdtemp(prefix="memory-per-replica-"))
    source = ref("split_diffusion_model")
    files = {
        "float32": (source, ref("split_t5xxl")),
        "float8_e4m3fn": (
            str(export_float8(source, directory / "flux-fp8.safetensors")),
            str(export_float8(ref("split_t5xxl"), directory / "t5-fp8.safetensors")),
        ),
        "gguf:Q8_0": (str(export_gguf(source, directory / "flux-q8.gguf", "Q8_0")), ref("split_t5xxl")),
        "gguf:Q4_0": (str(export_gguf(source, directory / "flux-q4.gguf", "Q4_0")), ref("split_t5xxl")),
    }
    rows = []
    for storage, (diffusion_model, t5xxl) in files.items():
        spec = {
            "diffusion_model": diffusion_model, "text_encoders": {"clip_l": ref("split_clip_l"), "t5xxl": t5xxl},
            "vae": ref("split_vae"), "single_file_config": ref("pipeline"),
        }  # fmt: skip
        local = Inpainter(**spec, device="cpu", dtype="float32").info()
        service = TextEncoder({"flux": spec}, device="cpu", dtype="float32")
        client = TextEncoderClient.local(service, "flux")
        shared = Inpainter(**spec, device="cpu", dtype="float32", text_encoder=client)
        service.encode("flux", ("a face",))
        [loaded] = service.info()["loaded"].values()
        rows.append({
            "storage": storage, "weight_dtype": local["weight_dtype"], **{f"local_{k}": v for k, v in
                                                                          local["weight_bytes"].items()},
            "shared_text_encoders": shared.info()["weight_bytes"]["text_encoders"],
            "text_encoder_deployment": loaded["weight_bytes"],
        })  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- report


def render(full: list[dict[str, Any]], tiny: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    if full:
        lines += [
            "Full-size architectures, counted on the meta device (GB = 10⁹ bytes of weights; activations extra):",
            "",
            "| family | diffusion model stored as | diffusion model | VAE | CLIP | T5-XXL | "
            "replica, own text encoders | replica, shared text encoder | TextEncoder deployment |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in full:
            t5 = f"{row['t5xxl'] / GB:.2f} ({row['t5_storage']})" if row["t5_storage"] else "—"
            vae = f"{row['vae'] / GB:.3f}"
            lines.append(
                f"| {row['family']} | {row['storage']} | {row['denoiser'] / GB:.2f} | {vae} | {row['clip'] / GB:.2f} | "
                f"{t5} | {row['replica_local_text'] / GB:.2f} | {row['replica_shared_text'] / GB:.2f} | "
                f"{row['text_encoder_deployment'] / GB:.2f} |"
            )
        lines.append("")
    if tiny:
        lines += [
            "Tiny Flux.1 dev (split layout) loaded by the Inpainter in float32 runs: bytes of the tensors it holds:",
            "",
            "| files | weight_dtype | transformer | VAE | text encoders (own) | text encoders (shared) | "
            "TextEncoder deployment |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in tiny:
            lines.append(
                f"| {row['storage']} | {row['weight_dtype']} | {row['local_denoiser']:,} | {row['local_vae']:,} | "
                f"{row['local_text_encoders']:,} | {row['shared_text_encoders']:,} | "
                f"{row['text_encoder_deployment']:,} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FACEDETAILER_TINY_MODELS", str(REPO / ".cache" / "tests" / "tiny-models"))
    storages = ["float32", "float16", "float8_e4m3fn", "gguf:Q8_0", "gguf:Q4_0"]
    full = full_size(storages) if args.full else []
    tiny = tiny_loaded() if args.tiny else []
    print(render(full, tiny))
    if args.json:
        args.json.write_text(json.dumps({"full_size": full, "tiny_loaded": tiny}, indent=1))


if __name__ == "__main__":
    main()
