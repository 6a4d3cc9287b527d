"""Stable Diffusion 1.x / 2.x / XL: a ``UNet2DConditionModel``, eps or v-prediction (+ zero terminal SNR).

The model sampling is ComfyUI's ``ModelSamplingDiscrete`` built from the checkpoint's beta
schedule. The prediction type and zero-terminal-SNR come, in this order, from the checkpoint's
configuration entry (``prediction``, ``zsnr``: SDXL v-prediction finetunes say it nowhere in
their files), the ``v_pred`` / ``ztsnr`` marker keys ComfyUI reads in a single file, and the
diffusers scheduler config (``prediction_type``, ``rescale_betas_zero_snr``).

Text: SD 1.x/2.x one CLIP encoder (last layer); SDXL two (both penultimate, CLIP-G's projected
pooled output and ComfyUI's size conditioning). A 9-channel inpainting UNet takes ComfyUI's
``concat_cond`` (:func:`deployments.sampling.inpaint_concat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deployments.families.base import FamilyRow, LatentFormat, ModelFamily, PromptEncoder, TextConditioning
from deployments.families.lean_forward import use_lean_forward
from deployments.families.text import ClipEncoder, repeat_to_common_length
from deployments.sampling import ModelSampling, inpaint_concat

__all__ = ["PREDICTIONS", "SDFamily", "SDPromptEncoder", "sd_scheduler_config"]

# The request-facing names of ComfyUI's model types for discrete models → diffusers' prediction_type.
PREDICTIONS = {"eps": "epsilon", "epsilon": "epsilon", "v_prediction": "v_prediction"}


def sd_scheduler_config(
    config: dict[str, Any], *, prediction: str | None = None, zsnr: bool | None = None
) -> dict[str, Any]:
    """The scheduler config with the checkpoint's overrides applied (None keeps the config's value)."""
    config = dict(config)
    if prediction is not None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction {prediction!r} is not one of {', '.join(sorted(set(PREDICTIONS)))}")
        config["prediction_type"] = PREDICTIONS[prediction]
    if zsnr is not None:
        config["rescale_betas_zero_snr"] = bool(zsnr)
    return config


class SDPromptEncoder(PromptEncoder):
    """SD 1.x/2.x (one CLIP, last layer) and SDXL (CLIP-L + CLIP-G, penultimate, G's projected pooled)."""

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[Any], *, sdxl: bool, device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        layer = "penultimate" if sdxl else "last"
        self.encoders = [
            ClipEncoder(
                tokenizer, encoder, layer=layer, pooled="projected" if sdxl and index == 1 else None, device=device
            )  # fmt: skip
            for index, (tokenizer, encoder) in enumerate(zip(tokenizers, encoders, strict=True))
        ]
        self.dtype = dtype

    def encode(self, chunks: tuple[str, ...]) -> TextConditioning:
        """[1, 77·n, D] hidden states (+ SDXL's pooled embedding of the first window).

        Each chunk (a BREAK / [CONCAT] part) is tokenised on its own into 77-token windows and
        encoded in its own encoder call; the chunks' hidden states are concatenated along the
        token axis, like Impact's one CLIPTextEncode per chunk + ConditioningConcat (one call per
        chunk, not one for all: batching moves float rounding). SDXL's encoders are joined on the
        feature axis. The pooled embedding is the first chunk's first window's, unweighted.
        """
        hidden_parts: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        with torch.inference_mode():
            for encoder in self.encoders:
                chunk_parts: list[torch.Tensor] = []
                for chunk in chunks:
                    hidden, chunk_pooled = encoder.encode_chunk(chunk)
                    chunk_parts.append(hidden.reshape(1, -1, hidden.shape[-1]))
                    if pooled is None and chunk_pooled is not None:
                        pooled = chunk_pooled  # the first chunk's (SDXL: the encoder that has one)
                hidden_parts.append(torch.cat(chunk_parts, dim=1))
        return TextConditioning(torch.cat(hidden_parts, dim=-1).to(self.dtype), pooled)


class SDFamily(ModelFamily):
    """A Stable Diffusion 1.x/2.x/XL checkpoint (see the module docstring)."""

    supports_loras = True
    supports_controlnet = True

    def __init__(
        self,
        components: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        vae_dtype: torch.dtype,
        prediction: str | None = None,
        zsnr: bool | None = None,
    ) -> None:
        self.components = components
        self.device, self.dtype, self.vae_dtype = device, dtype, vae_dtype
        self.denoiser = components.unet
        self.vae = components.vae
        use_lean_forward(self.vae)  # same bits, less memory traffic (deployments/families/lean_forward.py)
        use_lean_forward(self.denoiser)
        self.source, self.format = components.source, components.format
        self.name = "sdxl" if components.is_sdxl else "sd"
        self.is_inpaint = components.is_inpaint
        self.variant = "inpainting" if self.is_inpaint else None
        markers = getattr(components, "markers", {}) or {}
        if prediction is None and markers.get("v_pred"):
            prediction = "v_prediction"
        if zsnr is None and markers.get("ztsnr"):
            zsnr = True
        self.scheduler_config = sd_scheduler_config(components.scheduler_config, prediction=prediction, zsnr=zsnr)
        self.model_sampling = ModelSampling.from_scheduler_config(self.scheduler_config)
        vae_config = components.vae.config
        self.latent_format = LatentFormat(
            channels=int(getattr(vae_config, "latent_channels", 4)),
            scale_factor=vae_config.scaling_factor,
            shift_factor=getattr(vae_config, "shift_factor", None) or 0.0,
        )
        self.prompt_encoder = SDPromptEncoder(
            components.tokenizers, components.text_encoders, sdxl=components.is_sdxl, device=device, dtype=dtype
        )
        self.controlnets: Any = None  # the inpainter's ControlNetSet (residuals are added in forward)

    # ------------------------------------------------------------------ description

    def describe(self) -> dict[str, Any]:
        from deployments.inpainter_loading import describe

        described = {**describe(self.components), **super().describe()}
        # what the model sampling uses (the checkpoint's settings and markers applied)
        described["prediction_type"] = "v_prediction" if self.prediction == "v_prediction" else "epsilon"
        return described

    def inpaint_refusal(self) -> str:
        return f"this checkpoint is {self.name} with {self.denoiser.config.in_channels} input channels"

    # ------------------------------------------------------------------ conditioning

    def row_extras(self, padded: tuple[int, int], settings: Any) -> dict[str, Any]:
        if self.name != "sdxl":
            return {}
        # SDXL's size conditioning: ComfyUI passes the latent size × 8 as original and target size.
        time_ids = torch.tensor([[padded[0], padded[1], 0, 0, padded[0], padded[1]]], dtype=self.dtype)
        return {"time_ids": time_ids.to(self.device)}

    def inpaint_model_concat(
        self, latent: torch.Tensor, pixel_mask: torch.Tensor, masked_latent: torch.Tensor
    ) -> torch.Tensor:
        """InpaintModelConditioning: round(mask on the latent grid) and the greyed image's latent."""
        return inpaint_concat(latent, concat_mask=pixel_mask, concat_latent=masked_latent)

    def default_concat(self, latent: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
        """ComfyUI's ``concat_cond`` without InpaintModelConditioning: (fixed concat, or None and per-cycle)."""
        if mask is not None:
            return None, True  # round(mask) + each cycle's input latent
        return inpaint_concat(latent), False  # ones + the grey latent

    def cycle_concat(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return inpaint_concat(latent, mask)

    # ------------------------------------------------------------------ model call

    def batch_rows(
        self, rows: Sequence[FamilyRow], concats: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, torch.Tensor | None]:
        """Text embeddings, SDXL added conditions and inpainting channels of a call's rows, in row order."""
        contexts = [row.text.context for row in rows]
        added_conditions = None
        if self.name == "sdxl":
            added_conditions = {
                "text_embeds": torch.cat([row.text.pooled for row in rows]),
                "time_ids": torch.cat([row.extra["time_ids"] for row in rows]),
            }
        present = [concat for concat in concats if concat is not None]
        return repeat_to_common_length(contexts), added_conditions, torch.cat(present) if present else None

    def forward(
        self, calls: Sequence[tuple[Any, Any]], sample: torch.Tensor, timesteps: torch.Tensor, batch: Any
    ) -> torch.Tensor:
        context, added_conditions, concat = batch
        control = self.controlnets.residuals(
            [crop.state.get("control") for crop, _ in calls],
            [request for _, request in calls],
            sample,
            timesteps,
            context,
            added_conditions,
        ) if self.controlnets else {}  # fmt: skip
        if concat is not None:
            sample = torch.cat([sample, concat], dim=1)
        return self.denoiser(
            sample.to(self.dtype),
            timesteps,
            encoder_hidden_states=context,
            added_cond_kwargs=added_conditions,
            return_dict=False,
            **control,
        )[0].float()
