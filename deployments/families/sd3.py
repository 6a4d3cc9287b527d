"""Stable Diffusion 3 / 3.5: an MMDiT (diffusers' ``SD3Transformer2DModel``), rectified flow.

As ComfyUI's ``supported_models.SD3``: model sampling ``discrete_flow`` with shift 3 and
multiplier 1000 (the model gets σ·1000), CONST prediction (the model predicts the velocity;
x0 = x − σ·out), the 16-channel VAE's latents scaled by 1.5305 after subtracting 0.0609.

Text (ComfyUI's ``SD3ClipModel``), per BREAK chunk: CLIP-L (penultimate layer, unprojected
pooled) and CLIP-G (penultimate layer, projected pooled) windows joined on the feature axis and
zero-padded to the transformer's text width, then T5-XXL's tokens (at least 77) after them on
the token axis; pooled = [CLIP-L pooled, CLIP-G pooled]. Any encoder may be missing (an SD3.5
checkpoint without T5, as ComfyUI allows): its part is left out, and a missing pooled half is
zeros. Chunks are joined on the token axis, the first chunk's pooled output kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from deployments.families.base import FamilyRow, LatentFormat, PromptEncoder, TextConditioning
from deployments.families.dit import DiTFamily, RowBatch, pad_to_patch_size, rows_by_length
from deployments.families.text import ClipEncoder, T5Encoder
from deployments.sampling import ModelSampling

__all__ = ["SD3_LATENT", "SD3Family", "SD3PromptEncoder", "sd3_prompt_encoder"]

SD3_LATENT = LatentFormat(channels=16, scale_factor=1.5305, shift_factor=0.0609)
T5_MIN_LENGTH = 77


class SD3PromptEncoder(PromptEncoder):
    """CLIP-L + CLIP-G + T5 → [1, 77·n + t5, D], pooled [1, L + G] (module docstring)."""

    def __init__(
        self,
        clip_l: ClipEncoder | None,
        clip_g: ClipEncoder | None,
        t5: T5Encoder | None,
        *,
        context_dim: int,
        pooled_dims: tuple[int, int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.context_dim, self.pooled_dims, self.dtype, self.device = context_dim, pooled_dims, dtype, device

    def encode(self, chunks: tuple[str, ...]) -> TextConditioning:
        contexts: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        with torch.inference_mode():
            for chunk in chunks:
                context, chunk_pooled = self.encode_chunk(chunk)
                contexts.append(context)
                pooled = chunk_pooled if pooled is None else pooled
        assert pooled is not None
        return TextConditioning(torch.cat(contexts, dim=1).to(self.dtype), pooled.to(self.dtype))

    def encode_chunk(self, chunk: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One CLIPTextEncode of ``chunk``: (context [1, L, D], pooled [1, P]) in float32."""
        l_dim, g_dim = self.pooled_dims
        out: torch.Tensor | None = None
        pooled: torch.Tensor | None = None
        if self.clip_l is not None or self.clip_g is not None:
            lg: torch.Tensor | None = None
            l_pooled = torch.zeros((1, l_dim), device=self.device)
            g_pooled = torch.zeros((1, g_dim), device=self.device)
            if self.clip_l is not None:
                hidden, l_pooled = self.clip_l.encode_chunk(chunk)
                lg = hidden.float().reshape(1, -1, hidden.shape[-1])
            if self.clip_g is not None:
                hidden, g_pooled = self.clip_g.encode_chunk(chunk)
                g_out = hidden.float().reshape(1, -1, hidden.shape[-1])
                if lg is not None:
                    cut = min(lg.shape[1], g_out.shape[1])
                    lg = torch.cat([lg[:, :cut], g_out[:, :cut]], dim=-1)
                else:
                    lg = F.pad(g_out, (l_dim, 0))
            assert lg is not None
            out = F.pad(lg, (0, self.context_dim - lg.shape[-1]))
            pooled = torch.cat([l_pooled.float(), g_pooled.float()], dim=-1)
        if self.t5 is not None:
            t5_out = self.t5.encode_chunk(chunk).float()
            out = t5_out if out is None else torch.cat([out, t5_out], dim=-2)
        if out is None:
            out = torch.zeros((1, T5_MIN_LENGTH, self.context_dim), device=self.device)
        if pooled is None:
            pooled = torch.zeros((1, l_dim + g_dim), device=self.device)
        return out, pooled


def sd3_prompt_encoder(
    tokenizers: dict[str, Any],
    encoders: dict[str, Any],
    transformer_config: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> SD3PromptEncoder:
    """The checkpoint's CLIP-L / CLIP-G / T5 (any may be missing) for a transformer of ``transformer_config``."""

    def clip(name: str, pooled: str) -> ClipEncoder | None:
        if name not in encoders:
            return None
        return ClipEncoder(tokenizers[name], encoders[name], layer="penultimate", pooled=pooled, device=device)

    clip_l, clip_g = clip("clip_l", "pooled"), clip("clip_g", "projected")
    t5 = T5Encoder(tokenizers["t5xxl"], encoders["t5xxl"], min_length=T5_MIN_LENGTH, device=device) if (
        "t5xxl" in encoders
    ) else None  # fmt: skip
    # the pooled halves' widths (a missing encoder's half is zeros): CLIP-L's hidden size, CLIP-G's projection
    pooled_dim = int(transformer_config["pooled_projection_dim"])
    if "clip_l" in encoders:
        l_dim = int(encoders["clip_l"].config.hidden_size)
    elif "clip_g" in encoders:
        l_dim = pooled_dim - int(encoders["clip_g"].config.projection_dim)
    else:
        l_dim = 768
    encoder = SD3PromptEncoder(
        clip_l, clip_g, t5, context_dim=int(transformer_config["joint_attention_dim"]),
        pooled_dims=(l_dim, pooled_dim - l_dim), dtype=dtype, device=device,
    )  # fmt: skip
    encoder.names = tuple(sorted(encoders))
    return encoder


class SD3Family(DiTFamily):
    """An SD3/SD3.5 checkpoint (see the module docstring)."""

    name = "sd3"
    patch_size = 2

    def configure(self, config: Any, shift: float | None, prompt_encoder: PromptEncoder | None) -> None:
        self.patch_size = int(config.patch_size)
        self.latent_format = SD3_LATENT
        overrides = {"shift": float(shift)} if shift is not None else {}
        self.model_sampling = ModelSampling.for_comfy_model("SD3", **overrides)
        self.prompt_encoder = prompt_encoder or sd3_prompt_encoder(
            self.components.tokenizers, self.components.text_encoders, config, device=self.device, dtype=self.dtype
        )
        self.text_encoder_names = list(self.prompt_encoder.names)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(), "text_encoders": self.text_encoder_names, "text_encoding": self.text_encoding,
            "format": self.format,
        }  # fmt: skip

    # ------------------------------------------------------------------ model call

    def batch_rows(self, rows: Sequence[FamilyRow], concats: Sequence[torch.Tensor | None]) -> list[RowBatch]:
        return rows_by_length(rows, concats, self.device)

    def forward(
        self, calls: Sequence[tuple[Any, Any]], sample: torch.Tensor, timesteps: torch.Tensor, batch: list[RowBatch]
    ) -> torch.Tensor:
        """One transformer call per text length; the latent padded circularly to the patch grid, the output cut back."""
        height, width = sample.shape[-2:]
        padded = pad_to_patch_size(sample, self.patch_size)
        output = torch.empty(
            (sample.shape[0], int(self.denoiser.config.out_channels), *padded.shape[-2:]),
            dtype=torch.float32, device=sample.device,
        )  # fmt: skip
        for group in batch:
            result = self.denoiser(
                hidden_states=padded[group.rows].to(self.dtype),
                encoder_hidden_states=group.context,
                pooled_projections=group.pooled,
                timestep=timesteps[group.rows].to(self.dtype),
                return_dict=False,
            )[0]
            output[group.rows] = result.float()
        return output[..., :height, :width]
