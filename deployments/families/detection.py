"""Which family a file's weights belong to, read from their keys as ComfyUI's ``model_detection`` does.

Only names and shapes are read (a safetensors header, no tensor data), so a checkpoint is
described (``GET /v1/info``) without loading it. The rules are ComfyUI a125cd84's:

- the diffusion model's prefix: ``model.diffusion_model.`` when more than 5 keys carry it (a
  full checkpoint), none for a ``models/unet`` / ``models/diffusion_models`` file;
- **SD3** (MMDiT): ``joint_blocks.0.context_block.attn.qkv.weight``;
- **Flux**: ``double_blocks.0.img_attn.norm.key_norm.scale`` with ``img_in.weight``; a
  ``guidance_in`` embedding means dev (or Fill), none schnell; ``img_in``'s input width / 4 is
  the input channels: 16 for dev/schnell, 96 for Fill (ComfyUI's ``FluxInpaint``). Chroma
  (``distilled_guidance_layer``) is recognised and refused;
- **SD 1.x/2.x/XL** (the LDM UNet): ``input_blocks.0.0.weight``; SDXL when the UNet has the
  ``label_emb`` (ADM) input; input channels 9 = an inpainting UNet; the ``v_pred`` / ``ztsnr`` /
  ``edm_vpred.sigma_max`` marker keys as ComfyUI reads them;
- the same models under diffusers' names (``x_embedder.weight`` Flux, ``pos_embed.proj.weight`` +
  ``transformer_blocks.0.attn.add_q_proj.weight`` SD3, ``conv_in.weight`` + ``down_blocks`` UNet);
- text encoder files: CLIP (``final_layer_norm``) or T5 (``encoder.block.0.layer.0.SelfAttention.q.weight``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Detected",
    "FAMILY_PREFIXES",
    "UnsupportedModelError",
    "detect_diffusion_model",
    "detect_text_encoder",
    "diffusion_prefix",
    "read_header",
]

FULL_PREFIX = "model.diffusion_model."
# Where an all-in-one checkpoint keeps each part (ComfyUI's and diffusers' single files).
FAMILY_PREFIXES: dict[str, tuple[str, ...]] = {
    "vae": ("first_stage_model.", "vae."),
    "clip_l": ("text_encoders.clip_l.transformer.",),
    "clip_g": ("text_encoders.clip_g.transformer.",),
    "t5xxl": ("text_encoders.t5xxl.transformer.",),
}


class UnsupportedModelError(ValueError):
    """Weights of a model family this service does not run (named in the message)."""


@dataclass(frozen=True)
class Detected:
    """What the keys say: the family, its variant and the facts the family needs."""

    family: str  # "sd", "sdxl", "sd3", "flux"
    variant: str | None = None  # "inpainting", "dev", "schnell", "fill"
    layout: str = "ldm"  # "ldm" (original names) or "diffusers"
    prefix: str = ""
    facts: dict[str, Any] = field(default_factory=dict)  # in_channels, guidance, v_pred, ztsnr, …


ShapeOf = Callable[[str], tuple[int, ...]]


def read_header(path: str | Path) -> tuple[list[str], ShapeOf, dict[str, str]]:
    """A safetensors (or GGUF) file's keys, a shape lookup and each key's dtype, without reading tensor data."""
    from safetensors import safe_open

    if Path(path).suffix == ".gguf":
        from deployments.families.weight_storage import gguf_header

        return gguf_header(path)

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
        dtypes = {key: str(handle.get_slice(key).get_dtype()) for key in keys}
    return keys, shapes.__getitem__, dtypes


def diffusion_prefix(keys: Iterable[str]) -> str:
    """``model.diffusion_model.`` when more than 5 keys carry it (ComfyUI's ``unet_prefix_from_state_dict``)."""
    count = sum(1 for key in keys if key.startswith(FULL_PREFIX))
    return FULL_PREFIX if count > 5 else ""


def detect_diffusion_model(keys: Iterable[str], shape: ShapeOf) -> Detected:
    """The family of a diffusion model's weights (a full checkpoint's or a diffusion-model file's)."""
    keys = list(keys)
    present = set(keys)
    prefix = diffusion_prefix(keys)
    markers = {name: name in present for name in ("v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_mean")}

    def has(name: str) -> bool:
        return prefix + name in present

    if has("joint_blocks.0.context_block.attn.qkv.weight"):
        channels = shape(prefix + "x_embedder.proj.weight")[1]
        return Detected("sd3", layout="ldm", prefix=prefix, facts={"in_channels": channels})
    if has("double_blocks.0.img_attn.norm.key_norm.scale") and (
        has("img_in.weight") or has("distilled_guidance_layer.norms.0.scale")
    ):
        if has("distilled_guidance_layer.norms.0.scale") or has("distilled_guidance_layer.0.norms.0.scale"):
            raise UnsupportedModelError("Chroma is a Flux derivative this service does not run; supported: "
                                        "Flux.1 dev, schnell, Fill")  # fmt: skip
        return _flux(shape(prefix + "img_in.weight")[1] // 4, has("guidance_in.in_layer.weight"), "ldm", prefix)
    if has("input_blocks.0.0.weight"):
        return _unet(shape(prefix + "input_blocks.0.0.weight")[1], has("label_emb.0.0.weight"), "ldm", prefix, markers)
    # diffusers' names (a transformer/ or unet/ folder's weights, or a converted file)
    if "x_embedder.weight" in present and "transformer_blocks.0.attn.add_q_proj.weight" in present:
        guidance = "time_text_embed.guidance_embedder.linear_1.weight" in present
        return _flux(shape("x_embedder.weight")[1] // 4, guidance, "diffusers", "")
    if "pos_embed.proj.weight" in present and "transformer_blocks.0.attn.add_q_proj.weight" in present:
        return Detected("sd3", layout="diffusers", facts={"in_channels": shape("pos_embed.proj.weight")[1]})
    if "conv_in.weight" in present and any(key.startswith("down_blocks.") for key in present):
        sdxl = "add_embedding.linear_1.weight" in present
        return _unet(shape("conv_in.weight")[1], sdxl, "diffusers", "", markers)
    known = ("joint_blocks (SD3)", "double_blocks + img_in (Flux)", "input_blocks (SD 1.x/2.x/XL)")
    raise UnsupportedModelError(
        f"the weights match no supported model family (looked for {', '.join(known)} and their diffusers names); "
        "supported: sd, sdxl, sd3, flux"
    )


def _flux(in_channels: int, guidance: bool, layout: str, prefix: str) -> Detected:
    if in_channels == 96:
        variant = "fill"
    elif in_channels == 16:
        variant = "dev" if guidance else "schnell"
    else:
        raise UnsupportedModelError(
            f"a Flux model with {in_channels} input channels (Depth/Canny-style conditioning) is not supported; "
            "supported: Flux.1 dev and schnell (16), Fill (96)"
        )
    return Detected("flux", variant, layout, prefix, {"in_channels": in_channels, "guidance": guidance})


def _unet(in_channels: int, sdxl: bool, layout: str, prefix: str, markers: Mapping[str, bool]) -> Detected:
    if markers.get("edm_vpred.sigma_max") or markers.get("edm_mean"):
        raise UnsupportedModelError(
            "EDM checkpoints (Playground v2.5, CosXL's edm_vpred) have no ComfyUI discrete model sampling; "
            "supported: eps and v_prediction (+ zsnr)"
        )
    facts = {"in_channels": in_channels, "v_pred": markers.get("v_pred", False), "ztsnr": markers.get("ztsnr", False)}
    variant = "inpainting" if in_channels == 9 else None
    if in_channels not in (4, 9):
        raise UnsupportedModelError(f"a UNet with {in_channels} input channels is not supported; supported: 4, 9")
    return Detected("sdxl" if sdxl else "sd", variant, layout, prefix, facts)


def detect_text_encoder(keys: Iterable[str]) -> str:
    """``clip`` or ``t5xxl``: what kind of text encoder a file holds (transformers' names, any prefix).

    Which CLIP (L or G) a file is comes from the configuration (``text_encoders: {clip_l: …}``)
    or an all-in-one checkpoint's prefix; ComfyUI tells them apart by depth (CLIP-G has a 31st layer).
    """
    keys = list(keys)
    if any(key.endswith("encoder.block.0.layer.0.SelfAttention.q.weight") for key in keys):
        return "t5xxl"
    if any(key.endswith("text_model.final_layer_norm.weight") or key == "final_layer_norm.weight" for key in keys):
        return "clip"
    raise UnsupportedModelError("a text encoder file must hold CLIP or T5 weights (transformers names)")
