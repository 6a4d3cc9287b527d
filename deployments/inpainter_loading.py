"""Load the parts of a Stable Diffusion checkpoint the inpainter samples with.

Accepted ``model`` references:

- a diffusers folder (SD 1.x/2.x, SDXL, their 9-channel inpainting variants), local or a
  Hugging Face repo id served from the local cache (``HF_HUB_OFFLINE=1`` keeps it offline);
- a single original-layout ``.safetensors`` / ``.ckpt`` checkpoint (A1111/ComfyUI format),
  loaded with diffusers' ``from_single_file``; offline it needs ``single_file_config``, a
  diffusers folder (or cached repo id) of the same architecture;
- anything :func:`deployments.weights.resolve_weights` resolves (``tiny://``, ``pkg://``, URLs,
  ``owner/repo/file.safetensors`` hub files);

``sim://`` stand-ins are not loaded here: :func:`deployments.model_loading.load_sd_components`
chooses between this module and :mod:`deployments.simulated`, which builds on it.

Only the components are kept (UNet, VAE, text encoders, tokenizers, scheduler config): the
inpainter runs its own sampling loop, and no safety checker is loaded.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from deployments.weights import CorruptWeightsError, WeightsNotFoundError, resolve_weights

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# The first UNet convolution in original-layout checkpoints: its input channels tell an
# inpainting (9) from a normal (4) model.
LDM_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
LDM_SDXL_MARKER = "conditioner.embedders.1."
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SDComponents:
    """What the sampling loop needs from a checkpoint."""

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    source: str
    format: str  # "diffusers", "single_file" or "simulated"
    is_sdxl: bool = False
    markers: dict[str, bool] = field(default_factory=dict)  # a single file's ComfyUI marker keys (v_pred, ztsnr)
    # More for ``describe`` (called at each info(), so live figures stay live), e.g. a stand-in's cost model.
    extra_info: Callable[[], dict[str, Any]] | None = None

    @property
    def is_inpaint(self) -> bool:
        """A 9-channel UNet: latent + mask + masked-image latent (InpaintModelConditioning)."""
        return int(self.unet.config.in_channels) == 9


class ComponentsLoader(Protocol):
    """How :class:`deployments.inpainter.Inpainter` reads its checkpoint (:func:`load_sd_components`'s signature)."""

    def __call__(
        self, model: str, *, single_file_config: str | None, dtype: torch.dtype, cache_dir: Path | None
    ) -> SDComponents: ...


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """float32 on CPU; float16 on CUDA unless asked otherwise (bfloat16, float32)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}") from None


def _locate(reference: str, cache_dir: Path | None) -> Path | None:
    """A local path for ``reference``, or None for a hub repo id that diffusers resolves itself."""
    try:
        return resolve_weights(reference, cache_dir)
    except WeightsNotFoundError:
        if _REPO_ID.match(reference) and Path(reference).suffix not in SINGLE_FILE_SUFFIXES:
            return None
        raise


def _hub_cache(cache_dir: Path | None) -> str | None:
    return str(Path(cache_dir) / "hf") if cache_dir is not None else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def _load_folder(reference: str, dtype: torch.dtype, cache_dir: Path | None) -> SDComponents:
    """Load each component named in ``model_index.json`` with its own class (no pipeline object)."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    hub = {"cache_dir": _hub_cache(cache_dir), "local_files_only": _offline()}
    index = DiffusionPipeline.load_config(reference, **hub)
    parts: dict[str, Any] = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        entry = index.get(name)
        if not entry or entry[0] is None:
            continue
        library, class_name = entry
        cls = getattr(importlib.import_module(library), class_name)
        kwargs = dict(hub, subfolder=name)
        if not name.startswith("tokenizer"):
            kwargs["torch_dtype"] = dtype
        parts[name] = cls.from_pretrained(reference, **kwargs)
    missing = [name for name in ("unet", "vae", "text_encoder", "tokenizer") if name not in parts]
    if missing:
        raise ValueError(f"model_index.json has no {', '.join(missing)}")
    # Any scheduler class reads scheduler/scheduler_config.json; its values become the base of
    # every sampler's config (beta schedule, prediction type).
    scheduler_config = dict(DDPMScheduler.load_config(reference, subfolder="scheduler", **hub))
    return _components(parts, scheduler_config, source=reference, format="diffusers")


def _components(parts: dict[str, Any], scheduler_config: dict[str, Any], *, source: str, format: str) -> SDComponents:
    text_encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if parts.get("text_encoder_2") else [])
    tokenizers = [parts["tokenizer"]] + ([parts["tokenizer_2"]] if parts.get("tokenizer_2") else [])
    unet = parts["unet"]
    is_sdxl = len(text_encoders) == 2 or getattr(unet.config, "addition_embed_type", None) == "text_time"
    return SDComponents(
        unet=unet,
        vae=parts["vae"],
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        scheduler_config=scheduler_config,
        source=source,
        format=format,
        is_sdxl=is_sdxl,
    )


def _single_file_header(path: Path) -> tuple[int | None, bool]:
    """(UNet input channels, is SDXL) read from the checkpoint without loading every tensor."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            channels = handle.get_slice(LDM_CONV_IN).get_shape()[1] if LDM_CONV_IN in keys else None
    else:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        state = state.get("state_dict", state)
        keys = list(state)
        channels = state[LDM_CONV_IN].shape[1] if LDM_CONV_IN in state else None
    return channels, any(key.startswith(LDM_SDXL_MARKER) for key in keys)


def _config_is_sdxl(config: str, cache_dir: Path | None) -> bool:
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(config, cache_dir=_hub_cache(cache_dir), local_files_only=_offline())
    return bool(index.get("text_encoder_2") and index["text_encoder_2"][0])


def _load_single_file(path: Path, config: str | None, dtype: torch.dtype, cache_dir: Path | None) -> SDComponents:
    """``from_single_file`` with the pipeline class chosen from the checkpoint's own layout."""
    import diffusers

    channels, is_sdxl = _single_file_header(path)
    if config is not None:
        is_sdxl = _config_is_sdxl(config, cache_dir)
    elif _offline():
        raise ValueError(
            "a single-file checkpoint needs single_file_config (a diffusers folder or cached repo id "
            "of the same architecture) when the hub is offline"
        )
    inpaint = channels == 9
    class_name = "StableDiffusionXL" if is_sdxl else "StableDiffusion"
    class_name += "InpaintPipeline" if inpaint else "Pipeline"
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": _offline()}
    if config is not None:
        kwargs["config"] = config
    if channels is not None:
        kwargs["num_in_channels"] = channels  # the config folder may be the non-inpainting variant
    if not is_sdxl:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if cache_dir is not None:
        kwargs["cache_dir"] = _hub_cache(cache_dir)
    pipeline = getattr(diffusers, class_name).from_single_file(str(path), **kwargs)
    parts = {
        name: getattr(pipeline, name, None)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    }
    return _components(parts, dict(pipeline.scheduler.config), source=str(path), format="single_file")


def load_sd_components(
    model: str,
    *,
    single_file_config: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> SDComponents:
    """Load ``model``; :class:`WeightsNotFoundError` / :class:`CorruptWeightsError` name the reference."""
    path = _locate(model, cache_dir)
    config = single_file_config
    if config is not None:
        config_path = _locate(config, cache_dir)
        config = str(config_path) if config_path is not None else config
    if path is None:  # a hub repo id: only the local HF cache is consulted when offline
        try:
            return _load_folder(model, dtype, cache_dir)
        except (OSError, ValueError) as error:
            raise WeightsNotFoundError(
                f"{model}: not a local path and not loadable as a Hugging Face repo id"
                f"{' from the local cache (offline)' if _offline() else ''}: {error}"
            ) from error
    try:
        if path.is_dir():
            return _load_folder(str(path), dtype, cache_dir)
        return _load_single_file(path, config, dtype, cache_dir)
    except Exception as error:  # safetensors, pickle, json and shape errors all mean "unusable file"
        raise CorruptWeightsError(f"{path}: cannot be loaded as a Stable Diffusion checkpoint: {error}") from error


def describe(components: SDComponents) -> dict[str, Any]:
    """A JSON-able summary for ``info()``."""
    unet = components.unet.config
    return {
        "source": components.source,
        "format": components.format,
        "family": "sdxl" if components.is_sdxl else "sd",
        "inpainting_unet": components.is_inpaint,
        "unet_in_channels": int(unet.in_channels),
        "cross_attention_dim": unet.cross_attention_dim,
        "vae_scale_factor": 2 ** (len(components.vae.config.block_out_channels) - 1),
        "prediction_type": components.scheduler_config.get("prediction_type", "epsilon"),
        "scheduler_config": json.loads(json.dumps(components.scheduler_config, default=str)),
        **(components.extra_info() if components.extra_info is not None else {}),
    }


# ---------------------------------------------------------------------------- UNet names


def ldm_unet_renames(config: Any) -> dict[str, str]:
    """diffusers UNet module prefix → original (LDM/SGM ``openaimodel``) prefix.

    The inverse of diffusers' ``convert_ldm_unet_checkpoint``: single-file exports use it, and
    so do LoRA files trained on the original UNet (kohya's SDXL LoRAs name ``input_blocks``).
    Resnet-internal names differ too; see :data:`LDM_RESNET_PARTS`.
    """
    per_block = config.layers_per_block
    renames: dict[str, str] = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    for block in range(len(config.block_out_channels)):
        first = 1 + block * (per_block + 1)
        for layer in range(per_block):
            renames[f"down_blocks.{block}.resnets.{layer}"] = f"input_blocks.{first + layer}.0"
            renames[f"down_blocks.{block}.attentions.{layer}"] = f"input_blocks.{first + layer}.1"
        renames[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{first + per_block}.0.op"
    for block, block_type in enumerate(config.up_block_types):
        first = block * (per_block + 1)
        for layer in range(per_block + 1):
            renames[f"up_blocks.{block}.resnets.{layer}"] = f"output_blocks.{first + layer}.0"
            renames[f"up_blocks.{block}.attentions.{layer}"] = f"output_blocks.{first + layer}.1"
        slot = 2 if "CrossAttn" in block_type else 1
        renames[f"up_blocks.{block}.upsamplers.0.conv"] = f"output_blocks.{first + per_block}.{slot}.conv"
    return renames


LDM_RESNET_PARTS: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def to_ldm_unet_name(name: str, renames: dict[str, str]) -> str | None:
    """The LDM name of a diffusers UNet parameter or module (None if it has none)."""
    prefix = max((key for key in renames if name == key or name.startswith(key + ".")), key=len, default=None)
    if prefix is None:
        return None
    rest = name[len(prefix) + 1 :]
    if ".resnets." in prefix and rest:
        part, _, leaf = rest.partition(".")
        rest = ".".join(filter(None, [LDM_RESNET_PARTS.get(part, part), leaf]))
    return ".".join(filter(None, [renames[prefix], rest]))


# ---------------------------------------------------------------------------- LoRA

# (down, up) weight suffixes of the LoRA formats in use: kohya/A1111 (what ComfyUI users have),
# PEFT/diffusers, and diffusers' older attention-processor format.
_LORA_SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
)


LoraKey = tuple[tuple[str, float, float], ...]


def lora_key(loras: Any) -> LoraKey:
    """A hashable, normalised LoRA set: ((name, model_weight, clip_weight), ...)."""
    return tuple((str(name), float(model), float(clip)) for name, model, clip in loras)


class LoraPatcher:
    """Merges one LoRA set at a time into the UNet and text encoders.

    ``W += strength · (alpha / rank) · up @ down`` (ComfyUI's LoRA patch), with the model
    strength on the UNet and the clip strength on the text encoders. Merging needs no PEFT and
    costs nothing per step; switching sets restores the original weights of every touched layer
    (kept from the first merge) before merging the next set, so sets never mix. The inpainter's
    engine switches only between UNet calls of crops with different sets. Names are resolved for
    kohya files (``lora_unet_…`` on diffusers or original UNet names,
    ``lora_te_``/``lora_te1_``/``lora_te2_``) and PEFT/diffusers files (``unet.…``,
    ``text_encoder.…``). A LoRA that is not found is logged and skipped, as the reference does.
    """

    def __init__(self, components: SDComponents, lora_dir: Path | None) -> None:
        self.components = components
        self.lora_dir = lora_dir
        self._targets: dict[str, tuple[str, torch.nn.Module]] | None = None
        self.current: LoraKey = ()
        self.current_applied: list[str] = []
        self._originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}

    def find(self, name: str) -> Path | None:
        """``<lora_dir>/<name>.safetensors``, or a file whose path ends with it (ComfyUI's suffix match).

        The name comes from the request: it must stay inside ``lora_dir``
        (:func:`facedetailer.safe_paths.resolve_inside`), else :class:`UnsafeNameError`.
        """
        from facedetailer.safe_paths import files_inside, resolve_inside

        if self.lora_dir is None:
            return None
        file_name = name if Path(name).suffix in (".safetensors", ".pt", ".ckpt") else f"{name}.safetensors"
        direct = resolve_inside(self.lora_dir, file_name, kind="LoRA")
        if direct.is_file():
            return direct
        matches = [path for relative, path in files_inside(self.lora_dir) if f"/{relative}".endswith("/" + file_name)]
        return matches[0] if matches else None

    def activate(self, loras: Any) -> list[str]:
        """Make ``loras`` the merged set (a no-op if it already is); return the names applied."""
        key = lora_key(loras)
        if key == self.current:
            return list(self.current_applied)
        self._restore()
        applied: list[str] = []
        try:
            for name, model_weight, clip_weight in key:
                path = self.find(name)
                if path is None:
                    logger.warning("LoRA %r not found in %s: skipped", name, self.lora_dir)
                    continue
                self._merge(path, model_weight, clip_weight, self._originals)
                applied.append(name)
        except BaseException:
            self._restore()
            raise
        self.current, self.current_applied = key, applied
        return list(applied)

    def _restore(self) -> None:
        with torch.no_grad():
            for parameter, original in self._originals.values():
                parameter.copy_(original)
        self._originals = {}
        self.current, self.current_applied = (), []

    @contextmanager
    def applied(self, loras: tuple[tuple[str, float, float], ...]) -> Iterator[list[str]]:
        """Merge ``loras`` for the duration of the block, then go back to the previous set."""
        previous = self.current
        try:
            yield self.activate(loras)
        finally:
            self.activate(previous)

    def _merge(
        self,
        path: Path,
        model_weight: float,
        clip_weight: float,
        originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]],
    ) -> None:
        from safetensors.torch import load_file

        try:
            state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        except Exception as error:
            raise CorruptWeightsError(f"{path}: cannot be read as a LoRA file: {error}") from error
        targets = self._lora_targets()
        unused: list[str] = []
        with torch.no_grad():
            for key in state:
                pair = next(((down, up) for down, up in _LORA_SUFFIXES if key.endswith(down)), None)
                if pair is None:
                    continue
                base = key[: -len(pair[0])]
                target = targets.get(base)
                if target is None or base + pair[1] not in state:
                    unused.append(base)
                    continue
                part, module = target
                down, up = state[key].float(), state[base + pair[1]].float()
                alpha = state.get(base + ".alpha")
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                strength = model_weight if part == "unet" else clip_weight
                weight = module.weight
                delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (scale * strength)
                originals.setdefault(id(weight), (weight, weight.detach().clone()))
                weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
        if unused:
            logger.warning(
                "LoRA %s: %d layers match no module of this model (e.g. %s)", path.name, len(unused), unused[0]
            )

    def _lora_targets(self) -> dict[str, tuple[str, torch.nn.Module]]:
        """Every name a LoRA file may use for a Linear/Conv layer → (part, module)."""
        if self._targets is not None:
            return self._targets
        targets: dict[str, tuple[str, torch.nn.Module]] = {}
        unet = self.components.unet
        renames = ldm_unet_renames(unet.config)
        for name, module in unet.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            for alias in (name, to_ldm_unet_name(name, renames)):
                if alias:
                    targets["lora_unet_" + alias.replace(".", "_")] = ("unet", module)
            targets["unet." + name] = ("unet", module)
        kohya_prefixes = (("lora_te_", "lora_te1_"), ("lora_te2_",))
        for index, encoder in enumerate(self.components.text_encoders):
            part = "text_encoder" if index == 0 else "text_encoder_2"
            for name, module in encoder.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                full = name if name.startswith("text_model.") else "text_model." + name
                for prefix in kohya_prefixes[index]:
                    targets[prefix + full.replace(".", "_")] = (part, module)
                targets[f"{part}.{name}"] = (part, module)
                targets[f"{part}.{full}"] = (part, module)
        self._targets = targets
        return targets
