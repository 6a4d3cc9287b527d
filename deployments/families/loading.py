"""A checkpoint as users have it → the :class:`~deployments.families.base.ModelFamily` that runs it.

A checkpoint is described by a :class:`CheckpointSource`:

- ``model``: a diffusers folder (or a Hugging Face repo id in the local cache), one all-in-one
  single file (``.safetensors``/``.ckpt``), a ``tiny://``/``pkg://``/… reference
  (:func:`deployments.weights.resolve_weights`) or ``sim://`` simulated components;
- or ComfyUI's split layout: ``diffusion_model`` (a file from ``models/unet`` /
  ``models/diffusion_models``), ``text_encoders`` (``clip_l``, ``clip_g``, ``t5xxl`` files from
  ``models/text_encoders`` / ``models/clip``) and ``vae`` (``models/vae``);
- ``config``: a diffusers folder (or cached repo id) of the same architecture, giving the
  component configs and tokenizers a single file or the split layout does not carry (its
  weights are not needed); offline it is required for them;
- ``family`` (``sd``, ``sdxl``, ``sd3``, ``flux``) overrides the family detected from the
  weights' keys (:mod:`deployments.families.detection`); ``prediction``/``zsnr`` (SD) and
  ``shift`` (SD3, Flux) override the model sampling.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deployments.families.base import ModelFamily, PromptEncoder
from deployments.families.detection import (
    FAMILY_PREFIXES,
    Detected,
    UnsupportedModelError,
    detect_diffusion_model,
    detect_text_encoder,
    read_header,
)
from deployments.families.dit import DiTComponents
from deployments.families.flux_keys import flux_to_diffusers
from deployments.families.weight_storage import (
    gguf_weight_dtype,
    instantiate_gguf,
    is_gguf_state,
    keep_float8,
    keeps_stored_weights,
    logical_shape,
    read_gguf,
)
from deployments.weights import CorruptWeightsError, WeightsNotFoundError, is_simulated, resolve_weights

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointSource",
    "FAMILY_NAMES",
    "folder_family",
    "load_family",
    "load_text_encoders",
    "prepare_modules",
    "public_reference",
]

FAMILY_NAMES = ("sd", "sdxl", "sd3", "flux")
TEXT_ENCODER_NAMES = ("clip_l", "clip_g", "t5xxl")


@dataclass(frozen=True)
class CheckpointSource:
    """Where a checkpoint's weights are and what the configuration says about them (module docstring)."""

    model: str | None = None
    config: str | None = None
    diffusion_model: str | None = None
    text_encoders: Mapping[str, str] = field(default_factory=dict)
    vae: str | None = None
    family: str | None = None
    prediction: str | None = None
    zsnr: bool | None = None
    shift: float | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.diffusion_model is None):
            raise ValueError("a checkpoint is either model (folder or single file) or diffusion_model (split layout)")
        if self.family is not None and self.family not in FAMILY_NAMES:
            raise ValueError(f"family {self.family!r} is not one of {', '.join(FAMILY_NAMES)}")
        unknown = set(self.text_encoders) - {"clip_l", "clip_g", "t5xxl"}
        if unknown:
            raise ValueError(f"text_encoders: unknown {', '.join(sorted(unknown))}; known: clip_l, clip_g, t5xxl")
        if self.model is not None and (self.text_encoders or self.vae):
            raise ValueError("text_encoders and vae belong to the split layout (diffusion_model), not to model")

    @property
    def label(self) -> str:
        """A short name for logs and errors: the model reference, or the split layout's diffusion model."""
        return self.model if self.model is not None else str(self.diffusion_model)


def public_reference(reference: str | None) -> str | None:
    """A reference as it may be shown to clients: schemes and repo ids as written, a local path by its name only."""
    if reference is None or "://" in reference:
        return reference
    path = Path(reference)
    return path.name if path.is_absolute() else reference


def prepare_modules(modules: list[tuple[Any, torch.dtype]], device: torch.device) -> None:
    """Move each module to ``device`` in its dtype, inference mode, no gradients."""
    for module, module_dtype in modules:
        module.to(device)
        stored = keeps_stored_weights(module)  # float8 blocks / GGUF: upcast layer by layer when they run
        if not stored and getattr(module, "dtype", module_dtype) != module_dtype:  # an upcast VAE differs
            module.to(dtype=module_dtype)
        module.eval().requires_grad_(False)


def vae_run_dtype(vae: Any, dtype: torch.dtype) -> torch.dtype:
    """fp16 SDXL VAEs overflow; diffusers marks them force_upcast and decodes in float32."""
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    return torch.float32 if upcast else dtype


# diffusers folder component → ComfyUI's text encoder name, per family
FOLDER_TEXT_ENCODERS: dict[str, dict[str, str]] = {
    "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
    "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
_PIPELINE_FAMILIES = (("StableDiffusion3", "sd3"), ("Flux", "flux"), ("StableDiffusionXL", "sdxl"))


def folder_family(index: Mapping[str, Any]) -> str:
    """The family of a diffusers folder, from its ``model_index.json`` (pipeline class, else its parts)."""
    class_name = str(index.get("_class_name", ""))
    for prefix, family in _PIPELINE_FAMILIES:
        if class_name.startswith(prefix):
            return family
    transformer = index.get("transformer") or [None, None]
    if transformer[1] == "SD3Transformer2DModel":
        return "sd3"
    if transformer[1] == "FluxTransformer2DModel":
        return "flux"
    if (index.get("text_encoder_2") or [None])[0]:
        return "sdxl"
    if index.get("unet"):
        return "sd"
    raise UnsupportedModelError(
        f"a diffusers folder of {class_name or 'an unknown pipeline'} is not a supported family; supported: "
        "Stable Diffusion 1.x/2.x/XL, SD3/SD3.5, Flux.1 dev/schnell/Fill"
    )


def load_family(
    source: CheckpointSource,
    *,
    device: torch.device,
    dtype: torch.dtype,
    cache_dir: Path | None = None,
    load_components: Any = None,
    text_encoding: Callable[[str], PromptEncoder | None] | None = None,
) -> ModelFamily:
    """Load ``source`` with diffusers' and transformers' own model classes and wrap it in its family.

    ``load_components`` loads SD 1.x/2.x/XL checkpoints (default:
    :func:`deployments.inpainter_loading.load_sd_components`), and any ``model`` reference this
    module cannot locate as a file or folder (a stand-in's, see :mod:`deployments.model_loading`).
    :class:`~deployments.weights.WeightsNotFoundError` / :class:`~deployments.weights.CorruptWeightsError`
    name the file; :class:`~deployments.families.detection.UnsupportedModelError` says what is supported.

    ``text_encoding(family)`` may return the prompt encoder an SD3/Flux checkpoint uses instead of
    its own text encoders (a shared text encoder deployment, :mod:`deployments.text_encoder`):
    then those are not loaded at all.
    """
    from deployments.inpainter_loading import load_sd_components as real_sd_components

    load_sd_components = load_components or real_sd_components
    if source.diffusion_model is not None:
        components, detected, shared = _load_split(source, dtype, cache_dir, text_encoding)
        return _wrap(source, detected.family, components, device, dtype, shared)
    model = source.model
    assert model is not None
    try:
        path = _locate(model, cache_dir)
    except WeightsNotFoundError:  # nothing on disk or in the hub cache: the SD loader says what it is (or why not)
        config = _config(source, cache_dir)
        components = load_sd_components(model, single_file_config=config, dtype=dtype, cache_dir=cache_dir)
        return _wrap(source, "sd", components, device, dtype)
    if path is None or path.is_dir():  # a diffusers folder, local or a cached repo id
        family = source.family or folder_family(_folder_index(model if path is None else str(path), cache_dir))
        if family in ("sd", "sdxl"):
            config = _config(source, cache_dir)
            components = load_sd_components(model, single_file_config=config, dtype=dtype, cache_dir=cache_dir)
            return _wrap(source, family, components, device, dtype)
        shared = text_encoding(family) if text_encoding is not None else None
        components = _load_dit_folder(
            family, model if path is None else str(path), dtype, cache_dir, text_encoders=shared is None
        )
        return _wrap(source, family, components, device, dtype, shared)
    detected = _detect_file(path)
    family = source.family or detected.family
    if family in ("sd", "sdxl"):
        components = load_sd_components(
            model, single_file_config=_config(source, cache_dir), dtype=dtype, cache_dir=cache_dir
        )
        components.markers = {name: bool(detected.facts.get(name, False)) for name in ("v_pred", "ztsnr")}
        return _wrap(source, family, components, device, dtype)
    shared = text_encoding(family) if text_encoding is not None else None
    parts = _single_file_parts(path)
    if shared is not None:
        parts = {part: state for part, state in parts.items() if part not in TEXT_ENCODER_NAMES}
    components = _load_dit_files(family, parts, source, dtype, cache_dir, format="single_file")
    return _wrap(source, family, components, device, dtype, shared)


def _wrap(
    source: CheckpointSource,
    family: str,
    components: Any,
    device: torch.device,
    dtype: torch.dtype,
    prompt_encoder: PromptEncoder | None = None,
) -> ModelFamily:
    """Move the parts to the device in their run dtypes and build the family object."""
    vae_dtype = vae_run_dtype(components.vae, dtype)
    if family in ("sd", "sdxl"):
        from deployments.families.sd import SDFamily

        if source.shift is not None:
            raise ValueError(f"shift is an SD3/Flux setting; {source.label} is {family} (a discrete sigma table)")
        encoders = [(encoder, dtype) for encoder in components.text_encoders]
        prepare_modules([(components.unet, dtype), (components.vae, vae_dtype), *encoders], device)
        return SDFamily(
            components, device=device, dtype=dtype, vae_dtype=vae_dtype, prediction=source.prediction, zsnr=source.zsnr
        )
    if source.prediction is not None or source.zsnr is not None:
        raise ValueError(f"prediction and zsnr are SD/SDXL settings; {source.label} is {family} (rectified flow)")
    encoders = [(encoder, dtype) for encoder in components.text_encoders.values()]
    prepare_modules([(components.transformer, dtype), (components.vae, vae_dtype), *encoders], device)
    if family == "sd3":
        from deployments.families.sd3 import SD3Family

        return SD3Family(
            components, device=device, dtype=dtype, vae_dtype=vae_dtype, shift=source.shift,
            prompt_encoder=prompt_encoder,
        )  # fmt: skip
    from deployments.families.flux import FluxFamily

    return FluxFamily(
        components, device=device, dtype=dtype, vae_dtype=vae_dtype, shift=source.shift, prompt_encoder=prompt_encoder
    )


# ---------------------------------------------------------------------------- references


def _locate(reference: str, cache_dir: Path | None) -> Path | None:
    from deployments.inpainter_loading import _locate as locate

    return locate(reference, cache_dir)


def _config(source: CheckpointSource, cache_dir: Path | None) -> str | None:
    """The architecture folder of ``source`` as a local path (or a repo id diffusers resolves itself)."""
    if source.config is None:
        return None
    path = _locate(source.config, cache_dir)
    return str(path) if path is not None else source.config


def _hub(cache_dir: Path | None) -> dict[str, Any]:
    from deployments.inpainter_loading import _hub_cache, _offline

    return {"cache_dir": _hub_cache(cache_dir), "local_files_only": _offline()}


def _folder_index(reference: str, cache_dir: Path | None) -> dict[str, Any]:
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(reference, **_hub(cache_dir)))
    except (OSError, ValueError) as error:
        raise WeightsNotFoundError(f"{reference}: no diffusers model_index.json: {error}") from error


def _detect_file(path: Path) -> Detected:
    if path.suffix == ".gguf":
        raise UnsupportedModelError(
            f"{path.name}: a GGUF file holds a diffusion model only; give it as diffusion_model (ComfyUI's split "
            "layout, with text_encoders and vae)"
        )
    if path.suffix != ".safetensors":  # pickled checkpoints: SD 1.x/2.x/XL only, as before
        return Detected("sd")
    try:
        keys, shape, _ = read_header(path)
    except Exception as error:
        raise CorruptWeightsError(f"{path}: cannot be read as a safetensors file: {error}") from error
    return detect_diffusion_model(keys, shape)


# ---------------------------------------------------------------------------- transformer families


def _component_class(entry: Any) -> Any:
    library, class_name = entry
    return getattr(importlib.import_module(library), class_name)


def _load_dit_folder(
    family: str, reference: str, dtype: torch.dtype, cache_dir: Path | None, *, text_encoders: bool = True
) -> DiTComponents:
    """A diffusers SD3 / Flux folder: each part with the class ``model_index.json`` names for it."""
    index = _folder_index(reference, cache_dir)
    hub = _hub(cache_dir)
    parts: dict[str, Any] = {}
    for name in ("transformer", "vae", *(FOLDER_TEXT_ENCODERS[family] if text_encoders else ())):
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        parts[name] = _component_class(entry).from_pretrained(reference, subfolder=name, torch_dtype=dtype, **hub)
    missing = [name for name in ("transformer", "vae") if name not in parts]
    if missing:
        raise CorruptWeightsError(f"{reference}: model_index.json has no {', '.join(missing)}")
    tokenizers, encoders = {}, {}
    for folder_name, name in FOLDER_TEXT_ENCODERS[family].items():
        if folder_name in parts:
            encoders[name] = parts[folder_name]
            tokenizer = TOKENIZER_OF[folder_name]
            tokenizers[name] = _component_class(index[tokenizer]).from_pretrained(reference, subfolder=tokenizer, **hub)
    return DiTComponents(
        transformer=parts["transformer"], vae=parts["vae"], tokenizers=tokenizers, text_encoders=encoders,
        source=reference, format="diffusers",
    )  # fmt: skip


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return read_gguf(path) if path.suffix == ".gguf" else load_file(str(path))
    except Exception as error:
        kind = "GGUF" if path.suffix == ".gguf" else "safetensors"
        raise CorruptWeightsError(f"{path}: cannot be read as a {kind} file: {error}") from error


def _single_file_parts(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """An all-in-one SD3/Flux checkpoint split into its parts by ComfyUI's key prefixes."""
    state = _read_state(path)
    parts: dict[str, dict[str, torch.Tensor]] = {"diffusion_model": {}}
    for key, value in state.items():
        for part, prefixes in FAMILY_PREFIXES.items():
            prefix = next((prefix for prefix in prefixes if key.startswith(prefix)), None)
            if prefix is not None:
                parts.setdefault(part, {})[key[len(prefix) :]] = value
                break
        else:
            if key.startswith("model.diffusion_model."):
                parts["diffusion_model"][key] = value
    return parts


def _load_split(
    source: CheckpointSource,
    dtype: torch.dtype,
    cache_dir: Path | None,
    text_encoding: Callable[[str], PromptEncoder | None] | None = None,
) -> tuple[DiTComponents, Detected, PromptEncoder | None]:
    """ComfyUI's split layout: a diffusion model file, text encoder files and a VAE file."""
    assert source.diffusion_model is not None
    files = {"diffusion_model": source.diffusion_model, **dict(source.text_encoders)}
    if source.vae is not None:
        files["vae"] = source.vae
    paths = {part: resolve_weights(reference, cache_dir) for part, reference in files.items()}
    state = _read_state(paths["diffusion_model"])
    detected = detect_diffusion_model(list(state), lambda key: logical_shape(state[key]))
    family = source.family or detected.family
    shared = text_encoding(family) if text_encoding is not None and family in ("sd3", "flux") else None
    if shared is not None:  # the text encoders run elsewhere: their files are not read here
        paths = {part: path for part, path in paths.items() if part not in TEXT_ENCODER_NAMES}
    parts = {part: state if part == "diffusion_model" else _read_state(path) for part, path in paths.items()}
    if family in ("sd", "sdxl"):
        raise UnsupportedModelError(
            f"{source.diffusion_model}: the split layout is supported for SD3 and Flux; give an SD/SDXL UNet as a "
            "single file or a diffusers folder"
        )
    for part, path in paths.items():
        if part in ("clip_l", "clip_g", "t5xxl"):
            kind = detect_text_encoder(list(parts[part]))
            if (kind == "t5xxl") != (part == "t5xxl"):
                raise CorruptWeightsError(f"{path}: holds {kind} weights, configured as {part}")
    if "vae" not in parts:
        raise ValueError(f"{source.diffusion_model}: the split layout needs a vae file")
    components = _load_dit_files(family, parts, source, dtype, cache_dir, format="split", detected=detected)
    components.files = {part: public_reference(str(reference)) or "" for part, reference in files.items()}
    return components, Detected(family, detected.variant, detected.layout, detected.prefix, detected.facts), shared


def _load_dit_files(
    family: str,
    parts: dict[str, dict[str, torch.Tensor]],
    source: CheckpointSource,
    dtype: torch.dtype,
    cache_dir: Path | None,
    *,
    format: str,
    detected: Detected | None = None,
) -> DiTComponents:
    """SD3/Flux parts from state dicts, with the architecture and tokenizers of the ``config`` folder."""
    config = _config(source, cache_dir)
    if config is None:
        raise ValueError(
            f"{source.label}: a {family} single file or split layout needs single_file_config, a diffusers folder "
            f"(or cached repo id) of the same architecture giving the component configs and tokenizers"
        )
    index = _folder_index(config, cache_dir)
    hub = _hub(cache_dir)
    state = parts["diffusion_model"]
    if detected is None:
        detected = detect_diffusion_model(list(state), lambda key: logical_shape(state[key]))
    transformer_class = _component_class(index["transformer"])
    transformer_config = dict(transformer_class.load_config(config, subfolder="transformer", **hub))
    if family == "flux":
        converted = flux_to_diffusers(state) if detected.layout == "ldm" else dict(state)
        def blocks(prefix: str) -> int:
            return len({key.split(".")[1] for key in converted if key.startswith(prefix)})

        transformer_config.update(
            in_channels=int(logical_shape(converted["x_embedder.weight"])[1]),
            guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in converted,
            num_layers=blocks("transformer_blocks."),
            num_single_layers=blocks("single_transformer_blocks."),
        )  # the weights say which Flux.1 variant this is, whatever the config folder's was
    else:
        if detected.layout == "ldm":
            from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

            converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
        else:
            converted = dict(state)
    transformer = _instantiate(
        lambda: transformer_class.from_config(transformer_config), converted, dtype, "diffusion model"
    )
    vae_state = parts.get("vae")
    if not vae_state:
        raise ValueError(f"{source.label}: no VAE weights (an all-in-one file's vae. keys, or a vae file)")
    vae_class = _component_class(index["vae"])
    vae_config = dict(vae_class.load_config(config, subfolder="vae", **hub))
    if any(key.startswith(("encoder.down.", "decoder.up.")) for key in vae_state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        vae_state = convert_ldm_vae_checkpoint(vae_state, vae_config)
    vae = _instantiate(lambda: vae_class.from_config(vae_config), vae_state, dtype, "VAE")
    tokenizers, encoders = _text_encoders_from_states(family, parts, config, index, dtype, cache_dir)
    return DiTComponents(
        transformer=transformer, vae=vae, tokenizers=tokenizers, text_encoders=encoders, source=source.label,
        format=format,
    )  # fmt: skip


def _text_encoders_from_states(
    family: str,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    config: str,
    index: Mapping[str, Any],
    dtype: torch.dtype,
    cache_dir: Path | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizers, encoders) by ComfyUI's names from state dicts, architectures and tokenizers from ``config``."""
    hub = _hub(cache_dir)
    tokenizers, encoders = {}, {}
    for folder_name, name in FOLDER_TEXT_ENCODERS[family].items():
        encoder_state = parts.get(name)
        if not encoder_state:
            continue
        encoder_class = _component_class(index[folder_name])
        encoder_config = encoder_class.config_class.from_pretrained(config, subfolder=folder_name, **hub)
        encoders[name] = _instantiate(
            lambda cls=encoder_class, cfg=encoder_config: cls(cfg), _text_state(encoder_state), dtype, name
        )
        tokenizer = TOKENIZER_OF[folder_name]
        tokenizers[name] = _component_class(index[tokenizer]).from_pretrained(config, subfolder=tokenizer, **hub)
    return tokenizers, encoders


@dataclass
class TextEncoderParts:
    """An SD3/Flux checkpoint's text encoders alone (what a shared text encoder deployment loads)."""

    family: str
    tokenizers: dict[str, Any]
    encoders: dict[str, Any]
    transformer_config: dict[str, Any]  # the widths the prompt encoder pads to (SD3)


def load_text_encoders(
    source: CheckpointSource, *, dtype: torch.dtype, cache_dir: Path | None = None
) -> TextEncoderParts:
    """The text encoders of an SD3/Flux checkpoint in any layout, without its diffusion model or VAE.

    The family comes from the configuration or the diffusion model's keys (a header read); only
    the text encoders' weights are read.
    """
    hub = _hub(cache_dir)
    if source.diffusion_model is not None or (source.model is not None and _is_file(source.model, cache_dir)):
        if source.diffusion_model is not None:
            keys, shape, _ = read_header(resolve_weights(source.diffusion_model, cache_dir))
            files = {name: resolve_weights(reference, cache_dir) for name, reference in source.text_encoders.items()}
            parts = {name: _read_state(path) for name, path in files.items()}
        else:
            path = _locate(str(source.model), cache_dir)
            assert path is not None
            keys, shape, _ = read_header(path)
            parts = _read_prefixed(path, {name: FAMILY_PREFIXES[name] for name in TEXT_ENCODER_NAMES})
        family = source.family or detect_diffusion_model(keys, shape).family
        _check_text_family(source, family)
        config = _config(source, cache_dir)
        if config is None:
            raise ValueError(f"{source.label}: a {family} single file or split layout needs single_file_config")
        index = _folder_index(config, cache_dir)
        tokenizers, encoders = _text_encoders_from_states(family, parts, config, index, dtype, cache_dir)
    else:
        path = _locate(str(source.model), cache_dir)
        config = str(path) if path is not None else str(source.model)
        index = _folder_index(config, cache_dir)
        family = source.family or folder_family(index)
        _check_text_family(source, family)
        tokenizers, encoders = {}, {}
        for folder_name, name in FOLDER_TEXT_ENCODERS[family].items():
            entry = index.get(folder_name)
            if not entry or entry[0] is None:
                continue
            encoders[name] = _component_class(entry).from_pretrained(
                config, subfolder=folder_name, torch_dtype=dtype, **hub
            )
            tokenizer = TOKENIZER_OF[folder_name]
            tokenizers[name] = _component_class(index[tokenizer]).from_pretrained(config, subfolder=tokenizer, **hub)
    transformer_class = _component_class(index["transformer"])
    transformer_config = dict(transformer_class.load_config(config, subfolder="transformer", **hub))
    return TextEncoderParts(family, tokenizers, encoders, transformer_config)


def _check_text_family(source: CheckpointSource, family: str) -> None:
    if family not in ("sd3", "flux"):
        raise UnsupportedModelError(
            f"{source.label} is {family}: shared text encoding serves SD3 and Flux checkpoints (SD/SDXL keep their "
            "CLIP encoders, which LoRAs patch, in the inpainter)"
        )


def _is_file(reference: str, cache_dir: Path | None) -> bool:
    path = _locate(reference, cache_dir)
    return path is not None and path.is_file()


def _read_prefixed(path: Path, prefixes: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, torch.Tensor]]:
    """Only the tensors of a safetensors file under each part's prefixes (by part, prefix removed)."""
    from safetensors import safe_open

    parts: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                for part, part_prefixes in prefixes.items():
                    prefix = next((prefix for prefix in part_prefixes if key.startswith(prefix)), None)
                    if prefix is not None:
                        parts.setdefault(part, {})[key[len(prefix) :]] = handle.get_tensor(key)
                        break
    except Exception as error:
        raise CorruptWeightsError(f"{path}: cannot be read as a safetensors file: {error}") from error
    return parts


def _text_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' current names: CLIP without ``text_model.``, T5's shared embedding also as the encoder's."""
    out = {key.removeprefix("text_model."): value for key, value in state.items()}
    if "shared.weight" in out and "encoder.embed_tokens.weight" not in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    for stale in ("logit_scale", "embeddings.position_ids"):
        out.pop(stale, None)
    return out


def _instantiate(build: Any, state: Mapping[str, torch.Tensor], dtype: torch.dtype, part: str) -> Any:
    """A model from ``build()`` with exactly ``state`` as its weights, in ``dtype``.

    The weights are created on the meta device and assigned from ``state`` (no random init of a
    large model); a model with buffers that are not in its state dict is built normally instead.
    """
    if is_gguf_state(state):  # quantised: diffusers' GGUFLinear layers, dequantised when they run
        try:
            return instantiate_gguf(build, state, dtype)
        except ValueError as error:
            raise CorruptWeightsError(f"{part}: {error}") from error
    with torch.device("meta"):
        model = build()
    try:
        model.load_state_dict(state, strict=True, assign=True)
        leftovers = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    except RuntimeError as error:
        raise CorruptWeightsError(f"{part}: the weights do not fit the configured architecture: {error}") from error
    if leftovers:  # non-persistent buffers (e.g. CLIP's position ids): build it for real
        model = build()
        model.load_state_dict(state, strict=True)
    if keep_float8(model, dtype):  # float8 files: the blocks stay float8, upcast block by block when they run
        return model
    if any(parameter.dtype != dtype for parameter in model.parameters()):  # stored in another dtype (fp16 files)
        model = model.to(dtype)
    return model


# ---------------------------------------------------------------------------- description without loading


def describe_checkpoint(spec: Mapping[str, Any], cache_dir: Path | None = None) -> dict[str, Any]:
    """What a configured checkpoint is, from its files' headers and configs only (no weights read).

    ``spec`` holds :class:`CheckpointSource`'s fields (``single_file_config`` for ``config``). The
    family, variant, prediction and model sampling are what loading it would give; ``weight_dtype``
    is the dtype its diffusion model is stored in. References are shown as configured, local paths
    by their file name only. A checkpoint that cannot be described says why under ``error``.
    """
    options = {key: value for key, value in spec.items() if value is not None}
    options["config"] = options.pop("single_file_config", None)
    try:
        source = CheckpointSource(**options)
        return {"source": _public_source(source), **_describe_source(source, cache_dir)}
    except Exception as error:  # a broken entry is reported, not raised: the others still describe themselves
        message = f"{type(error).__name__}: {error}"
        for reference in _references(options):  # no server paths: each file by its name
            message = message.replace(reference, public_reference(reference) or "")
        return {"error": message}


def _references(options: Mapping[str, Any]) -> list[str]:
    found = [value for key, value in options.items() if isinstance(value, str) and key != "family"]
    found += [str(value) for value in dict(options.get("text_encoders") or {}).values()]
    return sorted(found, key=len, reverse=True)


def _public_source(source: CheckpointSource) -> dict[str, Any]:
    if source.model is not None:
        return {"model": public_reference(source.model), "config": public_reference(source.config)}
    files = {"diffusion_model": source.diffusion_model, **dict(source.text_encoders), "vae": source.vae}
    return {
        "split": {part: public_reference(reference) for part, reference in files.items() if reference},
        "config": public_reference(source.config),
    }


def _describe_source(source: CheckpointSource, cache_dir: Path | None) -> dict[str, Any]:
    import json

    from deployments.sampling import ModelSampling

    if source.model is not None and is_simulated(source.model):
        return {"family": "sd", "variant": None, "format": "simulated"}
    scheduler_config: dict[str, Any] | None = None
    weight_dtype: str | None = None
    if source.diffusion_model is not None:
        path = resolve_weights(source.diffusion_model, cache_dir)
        keys, shape, dtypes = read_header(path)
        weight_dtype = gguf_weight_dtype(path) if path.suffix == ".gguf" else _main_dtype(dtypes, shape)
        detected, layout = detect_diffusion_model(keys, shape), "split"
    else:
        path = _locate(source.model, cache_dir)  # type: ignore[arg-type]
        if path is None or path.is_dir():
            folder = str(path) if path is not None else str(source.model)
            index = _folder_index(folder, cache_dir)
            family = source.family or folder_family(index)
            variant, layout = None, "diffusers"
            if family in ("sd", "sdxl") and path is not None:
                config_path = path / "scheduler" / "scheduler_config.json"
                scheduler_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
                weights = sorted((path / "unet").glob("*.safetensors"))
            else:
                weights = sorted((path / "transformer").glob("*.safetensors")) if path is not None else []
            facts: dict[str, Any] = {}
            if weights:
                keys, shape, dtypes = read_header(weights[0])
                weight_dtype = _main_dtype(dtypes, shape)
                if family in ("sd3", "flux"):
                    found = detect_diffusion_model(keys, shape)
                    variant, facts = found.variant, found.facts
            detected = Detected(family, variant, "diffusers", facts=facts)
        else:
            layout = "single_file"
            if path.suffix == ".safetensors":
                keys, shape, dtypes = read_header(path)
                detected = detect_diffusion_model(keys, shape)
                weight_dtype = _main_dtype({key: dtype for key, dtype in dtypes.items()
                                            if key.startswith(detected.prefix)}, shape)  # fmt: skip
            else:
                detected = Detected("sd")
    family = source.family or detected.family
    if family in ("sd", "sdxl"):
        from deployments.families.sd import sd_scheduler_config

        prediction = source.prediction or ("v_prediction" if detected.facts.get("v_pred") else None)
        zsnr = source.zsnr if source.zsnr is not None else (True if detected.facts.get("ztsnr") else None)
        if scheduler_config is None:  # a single file: its config folder's schedule, else SD's
            scheduler_config = {}
            config = _config(source, cache_dir)
            if config is not None and Path(config, "scheduler", "scheduler_config.json").is_file():
                scheduler_config = json.loads(Path(config, "scheduler", "scheduler_config.json").read_text())
        config = sd_scheduler_config(scheduler_config, prediction=prediction, zsnr=zsnr)
        sampling = ModelSampling.from_scheduler_config(config)
        variant = "inpainting" if detected.facts.get("in_channels") == 9 else detected.variant
    else:
        variant = detected.variant
        model_class = "SD3" if family == "sd3" else {"fill": "FluxInpaint", "schnell": "FluxSchnell"}.get(
            str(variant), "Flux"
        )  # fmt: skip
        overrides = {"shift": float(source.shift)} if source.shift is not None else {}
        sampling = ModelSampling.for_comfy_model(model_class, **overrides)
    described = sampling.describe()
    return {
        "family": family,
        "variant": variant,
        "format": layout,
        "prediction": described["prediction"],
        "model_sampling": {key: value for key, value in described.items() if key not in ("sigma_min", "sigma_max")},
        "weight_dtype": weight_dtype,
    }


# safetensors' dtype names → torch's
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip


def _main_dtype(dtypes: Mapping[str, str], shape: Any = None) -> str | None:
    """The dtype most of a file's weight values are stored in (``float16``, ``bfloat16``, ``float8_e4m3fn``, …).

    Counted in values when ``shape`` (a key's shape) is given, else in tensors: files that store
    their matrices in float8 keep biases and norms wider.
    """
    counts: dict[str, int] = {}
    for key, dtype in dtypes.items():
        name = SAFETENSORS_DTYPES.get(str(dtype).upper(), str(dtype).removeprefix("torch.").lower())
        size = 1
        for extent in shape(key) if shape is not None else ():
            size *= int(extent)
        counts[name] = counts.get(name, 0) + size
    return max(counts, key=counts.__getitem__) if counts else None
