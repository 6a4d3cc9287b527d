"""Flux.1 dev, schnell and Fill: diffusers' ``FluxTransformer2DModel`` on 2×2-packed latents, rectified flow.

As ComfyUI's ``supported_models.Flux`` / ``FluxSchnell`` / ``FluxInpaint``:

- model sampling: dev and Fill ``flux`` with shift 1.15 (the model gets σ); schnell
  ``discrete_flow`` with shift 1 and multiplier 1 (also σ); CONST prediction;
- latents: 16 channels, (VAE latent − 0.1159) × 0.3611; the model sees them padded circularly to
  even sizes and packed 2×2 into tokens of 64 values (``b c (h 2) (w 2) → b (h w) (c 2 2)``),
  image positions (0, row, column), text positions 0; its output is unpacked and cut back;
- guidance: dev and Fill have a guidance embedding, fed the request's ``guidance`` (ComfyUI's
  FluxGuidance; 3.5 by default as ComfyUI's Flux conditioning). Schnell has none and ignores it.
  With cfg 1 (the default for Flux) the sampler makes one model call per step; ``negative: null``
  never evaluates a negative (Impact's Negative Cond Placeholder: basic guidance);
- Fill: 96 input channels (×4 packed = 384): the latent, the masked image's latent and the
  pixel mask packed 8×8 into 64 channels, concatenated as ComfyUI's ``Flux.concat_cond`` does for
  InpaintModelConditioning (without it: a zero image and the noise mask);
- text (ComfyUI's ``FluxClipModel``): T5-XXL's tokens (at least 256) as context, CLIP-L's
  unprojected pooled output as the pooled vector; chunks joined on the token axis.
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

__all__ = [
    "FLUX_LATENT",
    "FluxFamily",
    "FluxPromptEncoder",
    "fill_concat",
    "flux_prompt_encoder",
    "pack_latents",
    "pack_mask",
    "position_ids",
    "unpack_latents",
]

FLUX_LATENT = LatentFormat(channels=16, scale_factor=0.3611, shift_factor=0.1159)
T5_MIN_LENGTH = 256
PATCH = 2
MASK_PATCH = 8  # the Fill model's mask: 8×8 pixels per latent cell


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[b, c, 2h, 2w] → [b, h·w, c·4] (channel-major, then the 2×2 position), as ComfyUI's rearrange."""
    b, c, height, width = x.shape
    x = x.reshape(b, c, height // PATCH, PATCH, width // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (height // PATCH) * (width // PATCH), c * PATCH * PATCH)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a [2h, 2w] latent."""
    b, _, features = tokens.shape
    channels = features // (PATCH * PATCH)
    x = tokens.reshape(b, height // PATCH, width // PATCH, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, height, width)


def position_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """[h·w, 3] image token positions (0, row, column) of an [h, w] token grid, as ComfyUI's ``process_img``."""
    ids = torch.zeros((height, width, 3), device=device)
    ids[..., 1] += torch.arange(height, device=device, dtype=torch.float32)[:, None]
    ids[..., 2] += torch.arange(width, device=device, dtype=torch.float32)[None, :]
    return ids.reshape(height * width, 3)


def pack_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A mask [1, 1 or C, H, W] → [1, 64, h, w]: averaged over channels, resized to 8h × 8w, 8×8 cells to channels."""
    height, width = latent_size
    mask = torch.mean(mask.float(), dim=1, keepdim=True)
    if tuple(mask.shape[-2:]) != (height * MASK_PATCH, width * MASK_PATCH):
        mask = F.interpolate(mask, size=(height * MASK_PATCH, width * MASK_PATCH), mode="bilinear")
    mask = mask.reshape(mask.shape[0], height, MASK_PATCH, width, MASK_PATCH).permute(0, 2, 4, 1, 3)
    return mask.reshape(mask.shape[0], MASK_PATCH * MASK_PATCH, height, width)


def fill_concat(image_latent: torch.Tensor, mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Flux Fill's extra channels [1, 16 + 64, h, w]: the (model-space) image latent and the packed mask."""
    return torch.cat([image_latent, pack_mask(mask.to(image_latent.device), latent_size)], dim=1)


class FluxPromptEncoder(PromptEncoder):
    """T5 tokens as context, CLIP-L's pooled output (module docstring)."""

    names = ("clip_l", "t5xxl")

    def __init__(self, clip_l: ClipEncoder, t5: T5Encoder, *, dtype: torch.dtype) -> None:
        self.clip_l, self.t5, self.dtype = clip_l, t5, dtype

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
        """One CLIPTextEncode of ``chunk``: (T5 context [1, L, D], CLIP-L pooled [1, P]) in float32."""
        context = self.t5.encode_chunk(chunk).float()
        _, pooled = self.clip_l.encode_chunk(chunk)
        assert pooled is not None
        return context, pooled.float()


def flux_prompt_encoder(
    tokenizers: dict[str, Any], encoders: dict[str, Any], *, device: torch.device, dtype: torch.dtype
) -> FluxPromptEncoder:
    """Flux's text encoders (CLIP-L's last layer and pooled output, T5 of at least 256 tokens) as a prompt encoder."""
    missing = [name for name in ("clip_l", "t5xxl") if name not in encoders]
    if missing:
        raise ValueError(f"a Flux checkpoint needs clip_l and t5xxl text encoders; missing {', '.join(missing)}")
    return FluxPromptEncoder(
        ClipEncoder(tokenizers["clip_l"], encoders["clip_l"], layer="last", pooled="pooled", device=device),
        T5Encoder(tokenizers["t5xxl"], encoders["t5xxl"], min_length=T5_MIN_LENGTH, device=device),
        dtype=dtype,
    )


class FluxFamily(DiTFamily):
    """A Flux.1 checkpoint: dev, schnell or Fill (see the module docstring)."""

    name = "flux"
    patch_size = PATCH

    def configure(self, config: Any, shift: float | None, prompt_encoder: PromptEncoder | None) -> None:
        self.latent_format = FLUX_LATENT
        self.out_channels = int(config.out_channels or config.in_channels) // (PATCH * PATCH)
        in_channels = int(config.in_channels) // (PATCH * PATCH)
        self.has_guidance = bool(config.guidance_embeds)
        self.is_inpaint = in_channels > 2 * self.out_channels  # latent + image + mask: Fill
        if in_channels not in (self.out_channels, self.out_channels + self.out_channels + MASK_PATCH**2):
            raise ValueError(
                f"a Flux transformer with {in_channels} input channels is not Flux.1 dev/schnell (16) or Fill (96); "
                "supported: dev, schnell, Fill"
            )
        self.variant = "fill" if self.is_inpaint else ("dev" if self.has_guidance else "schnell")
        model_class = {"fill": "FluxInpaint", "dev": "Flux", "schnell": "FluxSchnell"}[self.variant]
        overrides = {"shift": float(shift)} if shift is not None else {}
        self.model_sampling = ModelSampling.for_comfy_model(model_class, **overrides)
        self.prompt_encoder = prompt_encoder or flux_prompt_encoder(
            self.components.tokenizers, self.components.text_encoders, device=self.device, dtype=self.dtype
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(), "text_encoders": ["clip_l", "t5xxl"], "text_encoding": self.text_encoding,
            "format": self.format,
        }  # fmt: skip

    def inpaint_refusal(self) -> str:
        return f"this checkpoint is Flux.1 {self.variant}, not Flux.1 Fill"

    # ------------------------------------------------------------------ conditioning

    def row_extras(self, padded: tuple[int, int], settings: Any) -> dict[str, Any]:
        return {"guidance": float(getattr(settings, "guidance", 3.5))}

    def inpaint_model_concat(
        self, latent: torch.Tensor, pixel_mask: torch.Tensor, masked_latent: torch.Tensor
    ) -> torch.Tensor:
        """InpaintModelConditioning for Fill: the greyed image's latent and the pixel mask packed 8×8 (not rounded)."""
        return fill_concat(masked_latent, pixel_mask, tuple(latent.shape[-2:]))

    def default_concat(self, latent: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        """Without InpaintModelConditioning: a zero image (in model space) and the noise mask, or ones."""
        image = self.latent_format.process_in(torch.zeros_like(latent))
        mask = torch.ones_like(latent[:, :1]) if mask is None else mask
        return fill_concat(image, mask, tuple(latent.shape[-2:])), False

    # ------------------------------------------------------------------ model call

    def batch_rows(self, rows: Sequence[FamilyRow], concats: Sequence[torch.Tensor | None]) -> list[RowBatch]:
        return rows_by_length(rows, concats, self.device, guidance=self.has_guidance)

    def forward(
        self, calls: Sequence[tuple[Any, Any]], sample: torch.Tensor, timesteps: torch.Tensor, batch: list[RowBatch]
    ) -> torch.Tensor:
        """One transformer call per text length on packed tokens; unpacked and cut back to the latent's size."""
        height, width = sample.shape[-2:]
        output: torch.Tensor | None = None
        for group in batch:
            x = sample[group.rows]
            if group.concat is not None:
                x = torch.cat([x, group.concat.to(x.device)], dim=1)
            x = pad_to_patch_size(x, PATCH)
            grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
            result = self.denoiser(
                hidden_states=pack_latents(x).to(self.dtype),
                encoder_hidden_states=group.context,
                pooled_projections=group.pooled,
                timestep=timesteps[group.rows].to(self.dtype),
                img_ids=position_ids(*grid, device=x.device).to(self.dtype),
                txt_ids=torch.zeros((group.context.shape[1], 3), device=x.device, dtype=self.dtype),
                guidance=group.guidance.to(self.dtype) if group.guidance is not None else None,
                return_dict=False,
            )[0]
            unpacked = unpack_latents(result.float(), x.shape[-2], x.shape[-1])
            if output is None:
                output = torch.empty((sample.shape[0], *unpacked.shape[1:]), dtype=torch.float32, device=x.device)
            output[group.rows] = unpacked
        assert output is not None
        return output[..., :height, :width]
