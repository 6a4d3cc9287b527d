"""What every model family tells the inpainter: its latent space, model sampling, text and model call.

The inpainter (:mod:`deployments.inpainter`) is the engine's backend for every family; it keeps
what does not depend on the model (padding, noise masks, the sampling processes, batching,
decoding to pixels) and asks the checkpoint's :class:`ModelFamily` for the rest:

- its **latent format**: channels, and the scale and shift ComfyUI's ``latent_format`` applies
  to the VAE's latents (``process_in``/``process_out``);
- its **model sampling** (a :class:`~deployments.sampling.ModelSampling`: eps, v-prediction or
  rectified flow, and its sigma table), so a crop's sampler computes what ComfyUI computes;
- its **text conditioning**: a :class:`PromptEncoder` turns a prompt's chunks into the family's
  conditioning tensors (:class:`TextConditioning`), one step that can move behind its own
  deployment later (it needs nothing but the encoders and the text);
- its **model call**: ComfyUI's convention — the sampler's ``x_in`` (c_in applied), the model
  timestep and per-row conditioning — turned into one call of the diffusers model and its
  output back into ComfyUI's raw output (eps, v or flow velocity), for a batch of rows each with
  its own timestep, text, cfg side and guidance;
- what it refuses: settings it cannot honour are a ``ValueError`` naming what is supported
  (HTTP 422 at the ingress).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

__all__ = [
    "FamilyRow",
    "LatentFormat",
    "ModelFamily",
    "PromptEncoder",
    "TextConditioning",
    "dtype_name",
    "encoder_tokenizers",
]


@dataclass(frozen=True)
class LatentFormat:
    """ComfyUI's ``latent_format``: the model sees (VAE latent − shift) × scale."""

    channels: int
    scale_factor: float
    shift_factor: float = 0.0

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale_factor + self.shift_factor


class TextConditioning(NamedTuple):
    """One prompt (its BREAK chunks) encoded for a family: what ComfyUI's CONDITIONING holds.

    ``context`` [1, L, D] are the token embeddings (the chunks' joined on the token axis, as
    ConditioningConcat joins them), ``pooled`` [1, P] the first chunk's pooled embedding (SDXL,
    SD3, Flux), or None.
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None


class PromptEncoder:
    """A family's text encoders: (prompt chunks) → :class:`TextConditioning`.

    Stateless apart from the encoders' weights, so it can run in its own process: the inpainter
    only caches its results.
    """

    names: tuple[str, ...] = ()  # the text encoders it runs, by ComfyUI's names (clip_l, clip_g, t5xxl)

    def encode(self, chunks: tuple[str, ...]) -> TextConditioning:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class FamilyRow:
    """One row of a model call's conditioning: a crop's positive or negative side."""

    text: TextConditioning
    extra: dict[str, Any] = field(default_factory=dict)  # per-family: SDXL size ids, Flux guidance


def encoder_tokenizers(prompt_encoder: PromptEncoder) -> list[tuple[Any, int]]:
    """(tokenizer, window length) of each text encoder a prompt encoder runs (see ``prompt_tokenizers``)."""
    from deployments.families.text import ClipEncoder, T5Encoder
    from facedetailer.token_windows import CLIP_MAX_LENGTH

    found: list[tuple[Any, int]] = []
    for value in vars(prompt_encoder).values():
        for encoder in value if isinstance(value, list | tuple) else (value,):
            if isinstance(encoder, ClipEncoder):
                found.append((encoder.tokenizer, encoder.length))
            elif isinstance(encoder, T5Encoder):
                found.append((encoder.tokenizer, CLIP_MAX_LENGTH))
    return found


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ModelFamily:
    """A loaded checkpoint of one family; see the module docstring for the division of work.

    Subclasses set the attributes and implement :meth:`encode_prompt`, :meth:`row_extras`,
    :meth:`batch_rows` and :meth:`forward`.
    """

    name: str = "?"  # "sd", "sdxl", "sd3", "flux"
    variant: str | None = None  # e.g. "inpainting", "dev", "schnell", "fill"
    latent_format: LatentFormat
    model_sampling: Any
    vae: Any
    denoiser: Any  # the UNet or transformer
    prompt_encoder: PromptEncoder
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    source: str
    format: str  # "diffusers", "single_file", "split", "simulated"
    # what the family accepts
    supports_loras: bool = False
    supports_controlnet: bool = False
    has_guidance: bool = False  # a guidance embedding (Flux dev/Fill): the request's ``guidance`` is fed to it
    is_inpaint: bool = False  # an inpainting model: extra input channels from the masked image
    # how many latent cells one model token covers (DiT patch size): latents are padded as ComfyUI does
    patch_size: int = 1

    # ------------------------------------------------------------------ description

    @property
    def prediction(self) -> str:
        """ComfyUI's name of what the model predicts: eps, v_prediction or const (rectified flow)."""
        return str(self.model_sampling.prediction)

    def sampling_settings(self) -> dict[str, Any]:
        """The model sampling ComfyUI would assign (kind and its settings), JSON-able."""
        describe = getattr(self.model_sampling, "describe", None)
        return dict(describe()) if callable(describe) else {}

    def describe(self) -> dict[str, Any]:
        from deployments.families.weight_storage import resident_bytes, storage_dtype

        stored = storage_dtype(self.denoiser)
        encoders = getattr(getattr(self, "components", None), "text_encoders", None) or []
        encoders = list(encoders.values()) if isinstance(encoders, dict) else list(encoders)
        return {
            "family": self.name,
            "variant": self.variant,
            "prediction": self.prediction,
            "model_sampling": self.sampling_settings(),
            "latent_channels": self.latent_format.channels,
            "latent_scale_factor": self.latent_format.scale_factor,
            "latent_shift_factor": self.latent_format.shift_factor,
            "weight_dtype": stored or dtype_name(self.dtype),  # as held in memory: float8 and GGUF stay so
            "weight_bytes": {  # resident, by part (text encoders: 0 when they run in the shared deployment)
                "denoiser": resident_bytes([self.denoiser]),
                "vae": resident_bytes([self.vae]),
                "text_encoders": resident_bytes(encoders),
            },
            "guidance": self.has_guidance,
            "inpainting": self.is_inpaint,
            "loras": self.supports_loras,
            "controlnet": self.supports_controlnet,
        }

    # ------------------------------------------------------------------ checks

    def check(self, index: int, job: Any, settings: Any) -> None:
        """Refuse what this family cannot honour (``ValueError`` naming what is supported)."""
        if job.loras and not self.supports_loras:
            names = ", ".join(name for name, _, _ in job.loras)
            raise ValueError(
                f"job {index}: LoRAs ({names}) are supported on SD 1.x/2.x/XL checkpoints only; this checkpoint is "
                f"{self.title()}"
            )
        if getattr(job, "control", None) is not None and not self.supports_controlnet:
            raise ValueError(
                f"job {index}: controlnet is supported on SD 1.x/2.x/XL checkpoints only; this checkpoint is "
                f"{self.title()}"
            )
        if getattr(settings, "inpaint_model", False) and not self.is_inpaint:
            raise ValueError(f"inpaint_model=True needs an inpainting checkpoint; {self.inpaint_refusal()}")
        if job.negative is None and not self.allows_missing_negative(settings):
            raise ValueError(self.missing_negative_refusal(settings))
        if job.negative is None:
            from deployments.sampling.registry import SAMPLERS

            spec = SAMPLERS.get(str(getattr(settings, "sampler_name", "")))
            if spec is not None and spec.needs_uncond:  # cfg++: ComfyUI's basic guider would give them x0 = 0
                raise ValueError(
                    f"negative: null has no negative for {settings.sampler_name}, which evaluates the negative at "
                    "every step (cfg++); give a negative prompt or pick a sampler without cfg_pp"
                )

    def title(self) -> str:
        return self.name + (f" ({self.variant})" if self.variant else "")

    def inpaint_refusal(self) -> str:
        return f"this checkpoint is {self.title()}, not an inpainting model"

    def allows_missing_negative(self, settings: Any) -> bool:
        """``negative: null`` samples with basic guidance (no negative call): only at cfg 1."""
        return float(getattr(settings, "cfg", 1.0)) == 1.0

    def missing_negative_refusal(self, settings: Any) -> str:
        return (
            f"negative: null samples with basic guidance (positive only, as Impact's Negative Cond Placeholder), "
            f"which ignores cfg; set cfg to 1 (got {settings.cfg}) or give a negative prompt"
        )

    # ------------------------------------------------------------------ text

    def encode_prompt(self, chunks: tuple[str, ...]) -> TextConditioning:
        return self.prompt_encoder.encode(chunks)

    def prompt_tokenizers(self) -> list[tuple[Any, int]]:
        """(tokenizer, window length) of each text encoder, for counting a prompt's 75-token windows.

        CLIP encoders with their own window; a T5 encoder (one sequence, never cut) is counted in
        CLIP-sized windows, so ``limits.max_prompt_tokens`` bounds its sequence alike. A prompt
        encoder that runs elsewhere (the shared text encoder) answers for its tokenizers itself.
        """
        own = getattr(self.prompt_encoder, "prompt_tokenizers", None)
        return list(own()) if callable(own) else encoder_tokenizers(self.prompt_encoder)

    def row_extras(self, padded: tuple[int, int], settings: Any) -> dict[str, Any]:
        """Per-crop values every row of the crop carries besides its text (SDXL size ids, guidance)."""
        return {}

    # ------------------------------------------------------------------ model call

    def batch_rows(self, rows: Sequence[FamilyRow], concats: Sequence[torch.Tensor | None]) -> Any:
        """The rows' conditioning made ready for :meth:`forward` (cached by the inpainter while unchanged)."""
        raise NotImplementedError

    def forward(
        self, calls: Sequence[tuple[Any, Any]], sample: torch.Tensor, timesteps: torch.Tensor, batch: Any
    ) -> torch.Tensor:
        """ONE model call: ``sample`` [n, C, h, w] (c_in applied), ``timesteps`` [n] → raw outputs, float32."""
        raise NotImplementedError

    # ------------------------------------------------------------------ VAE

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Deterministic VAE encode (the latent distribution's mean, as ComfyUI's VAEEncode), in model space."""
        mean = self.vae.encode(pixels.to(self.vae_dtype)).latent_dist.mean.float()
        return self.latent_format.process_in(mean)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents → the VAE's float pixels in [-1, 1] (unclamped)."""
        return self.vae.decode(self.latent_format.process_out(latents).to(self.vae_dtype)).sample

    def parameters_for_health(self) -> torch.Tensor | None:
        parameters = self.denoiser.parameters() if hasattr(self.denoiser, "parameters") else ()
        # the first plain tensor (a GGUF-quantised one is bytes)
        weight = next((tensor for tensor in parameters if getattr(tensor, "quant_type", None) is None), None)
        if weight is not None and weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return weight.float()  # isfinite has no float8 kernel
        return weight
