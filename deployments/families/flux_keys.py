"""Flux.1 transformer weights: Black Forest Labs' names (ComfyUI's ``models/unet`` files) ↔ diffusers' names.

The files Flux users have (``flux1-dev.safetensors``, ``flux1-fill-dev.safetensors``, …) use the
original names (``double_blocks.{i}.img_attn.qkv``, ``single_blocks.{i}.linear1``, …), with or
without a ``model.diffusion_model.`` prefix; diffusers' ``FluxTransformer2DModel`` splits the
fused projections (q, k, v; single blocks' q, k, v and MLP input) and stores the last
modulation as (scale, shift) where the original has (shift, scale). diffusers' own converter
assumes the full-size model's width (3072), so this module derives every size from the weights
and works for any width. :func:`flux_to_diffusers` and :func:`flux_from_diffusers` are inverses.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["flux_from_diffusers", "flux_to_diffusers", "strip_prefix"]

PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# one-to-one renames: original → diffusers (per block: {i} is the block index)
_GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_FINAL_MODULATION = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusion model's weights without a checkpoint prefix (``model.diffusion_model.``)."""
    for prefix in PREFIXES:
        if any(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return dict(state)


def _blocks(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(key[len(prefix) :].split(".", 1)[0]) for key in state if key.startswith(prefix)})


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def flux_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original (BFL/ComfyUI) Flux weights → ``FluxTransformer2DModel``'s state dict. Unknown keys raise."""
    source = strip_prefix(state)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return source[key]

    for name, target in _GLOBAL.items():
        for leaf in ("weight", "bias"):
            if f"{name}.{leaf}" in source:
                out[f"{target}.{leaf}"] = take(f"{name}.{leaf}")
    for leaf in ("weight", "bias"):
        key = f"{_FINAL_MODULATION[0]}.{leaf}"
        if key in source:
            out[f"{_FINAL_MODULATION[1]}.{leaf}"] = _swap_halves(take(key))
    hidden = int(source["img_in.weight"].shape[0])
    for i in _blocks(source, "double_blocks."):
        old, new = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for name, target in _DOUBLE.items():
            for leaf in ("weight", "bias"):
                out[f"{new}{target}.{leaf}"] = take(f"{old}{name}.{leaf}")
        for name, target in _DOUBLE_NORMS.items():
            out[new + target] = take(old + name)
        for name, targets in _DOUBLE_QKV.items():
            for leaf in ("weight", "bias"):
                for target, part in zip(targets, take(f"{old}{name}.{leaf}").chunk(3, dim=0), strict=True):
                    out[f"{new}{target}.{leaf}"] = part
    for i in _blocks(source, "single_blocks."):
        old, new = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for name, target in _SINGLE.items():
            for leaf in ("weight", "bias"):
                out[f"{new}{target}.{leaf}"] = take(f"{old}{name}.{leaf}")
        for name, target in _SINGLE_NORMS.items():
            out[new + target] = take(old + name)
        for leaf in ("weight", "bias"):
            fused = take(f"{old}linear1.{leaf}")
            sizes = (hidden, hidden, hidden, fused.shape[0] - 3 * hidden)
            for target, part in zip(_SINGLE_FUSED, torch.split(fused, sizes, dim=0), strict=True):
                out[f"{new}{target}.{leaf}"] = part
    unknown = sorted(set(source) - used)
    if unknown:
        more = " …" if len(unknown) > 5 else ""
        raise KeyError(f"Flux weights with no diffusers name: {', '.join(unknown[:5])}{more}")
    return out


def flux_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``FluxTransformer2DModel``'s state dict → the original (BFL/ComfyUI) names (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    for name, target in _GLOBAL.items():
        for leaf in ("weight", "bias"):
            if f"{target}.{leaf}" in state:
                out[f"{name}.{leaf}"] = state[f"{target}.{leaf}"]
    for leaf in ("weight", "bias"):
        key = f"{_FINAL_MODULATION[1]}.{leaf}"
        if key in state:
            out[f"{_FINAL_MODULATION[0]}.{leaf}"] = _swap_halves(state[key])
    for i in _blocks(state, "transformer_blocks."):
        old, new = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for name, target in _DOUBLE.items():
            for leaf in ("weight", "bias"):
                out[f"{old}{name}.{leaf}"] = state[f"{new}{target}.{leaf}"]
        for name, target in _DOUBLE_NORMS.items():
            out[old + name] = state[new + target]
        for name, targets in _DOUBLE_QKV.items():
            for leaf in ("weight", "bias"):
                out[f"{old}{name}.{leaf}"] = torch.cat([state[f"{new}{target}.{leaf}"] for target in targets])
    for i in _blocks(state, "single_transformer_blocks."):
        old, new = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for name, target in _SINGLE.items():
            for leaf in ("weight", "bias"):
                out[f"{old}{name}.{leaf}"] = state[f"{new}{target}.{leaf}"]
        for name, target in _SINGLE_NORMS.items():
            out[old + name] = state[new + target]
        for leaf in ("weight", "bias"):
            out[f"{old}linear1.{leaf}"] = torch.cat([state[f"{new}{target}.{leaf}"] for target in _SINGLE_FUSED])
    return out
