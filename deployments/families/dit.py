"""What the transformer families (SD3, Flux) share: their parts, padding to patches, one call per text length.

A DiT attends over the text and image tokens jointly, so rows whose texts have different
lengths cannot share a call the way the UNet's cross-attention rows can (repeating a text
changes joint attention): :func:`rows_by_length` splits a call's rows into sub-batches of equal
text length, each one model call, in row order. A latent whose size is not a multiple of the
patch size is padded circularly and the output cut back, as ComfyUI's ``pad_to_patch_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from deployments.families.base import FamilyRow, ModelFamily, PromptEncoder

__all__ = ["DiTComponents", "DiTFamily", "RowBatch", "pad_to_patch_size", "rows_by_length"]


@dataclass
class DiTComponents:
    """A transformer checkpoint's parts: the denoiser, the VAE and the text encoders by ComfyUI's names."""

    transformer: Any
    vae: Any
    tokenizers: dict[str, Any]  # "clip_l", "clip_g", "t5xxl"
    text_encoders: dict[str, Any]
    source: str
    format: str  # "diffusers", "single_file", "split"
    files: dict[str, str] = field(default_factory=dict)  # the split layout's files by part (names only in info)

    @property
    def unet(self) -> Any:  # the inpainter's health check and ControlNet checks look for a denoiser here
        return self.transformer


class DiTFamily(ModelFamily):
    """A transformer checkpoint (SD3, Flux) made of :class:`DiTComponents`; the family reads its
    transformer's config, model sampling and text encoders in :meth:`configure`."""

    def __init__(
        self,
        components: DiTComponents,
        *,
        device: torch.device,
        dtype: torch.dtype,
        vae_dtype: torch.dtype,
        shift: float | None = None,
        prompt_encoder: PromptEncoder | None = None,
    ) -> None:
        self.components = components
        self.device, self.dtype, self.vae_dtype = device, dtype, vae_dtype
        self.denoiser = components.transformer
        self.vae = components.vae
        self.source, self.format = components.source, components.format
        # shared text encoding (deployments.text_encoder) hands the encoder in; else the checkpoint's own
        self.text_encoding = "local" if prompt_encoder is None else "shared"
        self.configure(self.denoiser.config, shift, prompt_encoder)

    def configure(self, config: Any, shift: float | None, prompt_encoder: PromptEncoder | None) -> None:
        raise NotImplementedError


@dataclass
class RowBatch:
    """Rows of one model call that share a text length: their positions in the call and stacked conditioning."""

    rows: torch.Tensor  # long [k]: positions in the call
    context: torch.Tensor  # [k, L, D]
    pooled: torch.Tensor  # [k, P]
    guidance: torch.Tensor | None = None  # [k] (Flux dev/Fill)
    concat: torch.Tensor | None = None  # [k, C', h, w] inpainting channels (Flux Fill)


def rows_by_length(
    rows: Sequence[FamilyRow], concats: Sequence[torch.Tensor | None], device: torch.device, guidance: bool = False
) -> list[RowBatch]:
    """The rows grouped by text length (first-seen order), each group's conditioning stacked."""
    groups: dict[int, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(int(row.text.context.shape[1]), []).append(index)
    batches = []
    for members in groups.values():
        present = [concats[index] for index in members if concats[index] is not None]
        if present and len(present) != len(members):
            raise ValueError("rows of one call must all have inpainting channels or none")
        batches.append(
            RowBatch(
                rows=torch.tensor(members, dtype=torch.long, device=device),
                context=torch.cat([rows[index].text.context for index in members]),
                pooled=torch.cat([rows[index].text.pooled for index in members]),
                guidance=torch.tensor(
                    [float(rows[index].extra["guidance"]) for index in members], dtype=torch.float32, device=device
                ) if guidance else None,
                concat=torch.cat(present) if present else None,
            )
        )  # fmt: skip
    return batches


def pad_to_patch_size(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Pad the last two axes up to multiples of ``patch`` with circular padding (ComfyUI's default)."""
    pad_h = (patch - x.shape[-2] % patch) % patch
    pad_w = (patch - x.shape[-1] % patch) % patch
    if not pad_h and not pad_w:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
