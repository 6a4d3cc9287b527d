"""Weights kept as they are stored — float8 or GGUF-quantised — and upcast layer by layer when they run.

ComfyUI users download Flux and T5-XXL in ``float8_e4m3fn`` (half the bytes of fp16) and
GGUF-quantised transformers (``Q8_0``, ``Q4_K``…, ComfyUI-GGUF's ``models/unet`` files). Loading
them upcast to the run dtype would give back the memory they save, so:

- **float8** (a safetensors file whose weights are ``float8_e4m3fn``/``float8_e5m2``): the weights
  of the model's repeated blocks (its ``_no_split_modules`` — Flux's double and single blocks,
  SD3's joint blocks, T5's blocks, CLIP's layers) stay float8 in memory; each block's weights are
  upcast to the run dtype just before the block runs and dropped after it (:func:`keep_float8`).
  Whatever lies outside the blocks (embedders, final norm and projection: a few percent) and
  embedding tables (looked up, not run: T5 reads its position-bias table before the block runs)
  are upcast at load. Casting float8 to a wider float is exact, so a block computes exactly what it
  computes with weights upcast at load — bit for bit (tests/deployments/test_weight_storage.py).
  (Diffusers' ``enable_layerwise_casting`` casts a whole module back to one storage dtype after
  each call, which would round any tensor a file stores wider — biases, norms — to float8.)
- **GGUF** (a ``.gguf`` diffusion model): diffusers' GGUF support — the tensors are read as
  ``GGUFParameter`` s, the linear layers that have quantised weights become diffusers'
  ``GGUFLinear`` (dequantised to the run dtype at each call), other tensors are plain.

:func:`storage_dtype` names what a model keeps resident (``float8_e4m3fn``, ``gguf:Q8_0``,
``float16``…; the storage of most of its weight values) and :func:`resident_bytes` counts the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FLOAT8",
    "gguf_header",
    "instantiate_gguf",
    "is_gguf_state",
    "keep_float8",
    "keeps_stored_weights",
    "logical_shape",
    "read_gguf",
    "resident_bytes",
    "storage_dtype",
]

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_MARK = "_facedetailer_stored_weights"  # set on a model whose weights must not be cast as a whole


def keeps_stored_weights(module: Any) -> bool:
    """True for a model loaded by this module (float8 blocks or GGUF): never ``.to(dtype)`` it as a whole."""
    return bool(getattr(module, _MARK, False))


# ---------------------------------------------------------------------------- float8


def _upcast_before(compute_dtype: torch.dtype) -> Callable[[torch.nn.Module, Any], None]:
    def hook(module: torch.nn.Module, args: Any) -> None:
        stored = []
        for parameter in module.parameters():
            stored.append((parameter, parameter.data))
            if parameter.dtype in FLOAT8:
                parameter.data = parameter.data.to(compute_dtype)
        module._facedetailer_stored = stored  # type: ignore[assignment]

    return hook


def _restore_after(module: torch.nn.Module, args: Any, output: Any) -> None:
    for parameter, data in getattr(module, "_facedetailer_stored", ()):
        parameter.data = data
    module._facedetailer_stored = ()  # type: ignore[assignment]


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost modules of the model's repeated block classes (``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ in names and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def keep_float8(model: torch.nn.Module, compute_dtype: torch.dtype) -> bool:
    """If ``model`` holds float8 weights: keep its blocks' float8, upcast per block when run; upcast the rest now.

    Returns False (nothing done) for a model without float8 weights or without block classes.
    """
    if not any(parameter.dtype in FLOAT8 for parameter in model.parameters()):
        return False
    blocks = _blocks(model)
    if not blocks:
        return False
    # embedding tables are looked up, not run: a parent may read one before its block runs (T5's position bias)
    lookups = {id(parameter) for module in model.modules() if isinstance(module, torch.nn.Embedding)
               for parameter in module.parameters()}  # fmt: skip
    inside = {id(parameter) for block in blocks for parameter in block.parameters()} - lookups
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in inside and tensor.is_floating_point() and tensor.dtype != compute_dtype:
            tensor.data = tensor.data.to(compute_dtype)
    for block in blocks:
        for parameter in block.parameters():  # a block's wider tensors (biases, norms) run in the compute dtype
            if parameter.dtype not in FLOAT8 and parameter.dtype != compute_dtype:
                parameter.data = parameter.data.to(compute_dtype)
        block.register_forward_pre_hook(_upcast_before(compute_dtype))
        block.register_forward_hook(_restore_after)
    setattr(model, _MARK, True)
    return True


# ---------------------------------------------------------------------------- GGUF


def read_gguf(path: str | Path) -> dict[str, torch.Tensor]:
    """A GGUF file's tensors by name: quantised ones as diffusers' ``GGUFParameter`` (with their quant type)."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    return dict(load_gguf_checkpoint(str(path)))


def is_gguf_state(state: Mapping[str, Any]) -> bool:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    return any(isinstance(value, GGUFParameter) for value in state.values())


def logical_shape(tensor: Any) -> tuple[int, ...]:
    """The shape a tensor has as a weight: a quantised GGUF tensor's byte rows turned back into values."""
    quant_type = getattr(tensor, "quant_type", None)
    if quant_type is None:
        return tuple(tensor.shape)
    import gguf
    from diffusers.quantizers.gguf.utils import UNQUANTIZED_TYPES

    if gguf.GGMLQuantizationType(quant_type) in UNQUANTIZED_TYPES:
        return tuple(tensor.shape)
    return tuple(gguf.quants.quant_shape_from_byte_shape(tuple(tensor.shape), quant_type))


def gguf_header(path: str | Path) -> tuple[list[str], Callable[[str], tuple[int, ...]], dict[str, str]]:
    """A GGUF file's tensor names, shapes (as weights) and types (``float32`` or ``gguf:Q8_0``…), no data read."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    shapes: dict[str, tuple[int, ...]] = {}
    types: dict[str, str] = {}
    for tensor in reader.tensors:
        shapes[tensor.name] = tuple(int(size) for size in reversed(tensor.shape.tolist()))  # ggml's order is reversed
        kind = gguf.GGMLQuantizationType(tensor.tensor_type).name
        types[tensor.name] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(kind, f"gguf:{kind}")
    return list(shapes), shapes.__getitem__, types


def gguf_weight_dtype(path: str | Path) -> str | None:
    """The type most of a GGUF file's weight values are stored in (``gguf:Q8_0``, or a float type)."""
    keys, shape, types = gguf_header(path)
    sizes: dict[str, int] = {}
    for key in keys:
        count = 1
        for size in shape(key):
            count *= size
        sizes[types[key]] = sizes.get(types[key], 0) + count
    return max(sizes, key=sizes.__getitem__) if sizes else None


def instantiate_gguf(build: Callable[[], Any], state: Mapping[str, Any], compute_dtype: torch.dtype) -> Any:
    """A model of ``build()`` with GGUF ``state`` as its weights: quantised linears as diffusers' ``GGUFLinear``.

    The model is built on the meta device and every tensor assigned as it is (a quantised tensor's
    byte rows are not the layer's shape, so ``load_state_dict``'s shape check cannot be used);
    a missing or unexpected name is an error naming it.
    """
    from diffusers.quantizers.gguf.utils import _replace_with_gguf_linear

    with torch.device("meta"):
        model = build()
    _replace_with_gguf_linear(model, compute_dtype, dict(state))
    expected = {name for name, _ in [*model.named_parameters(), *model.named_buffers()]}
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"GGUF tensors the architecture does not have: {', '.join(unexpected[:5])}")
    for key, value in state.items():
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner)
        if name in module._buffers:
            module._buffers[name] = value.to(compute_dtype) if value.is_floating_point() else value
            continue
        if getattr(value, "quant_type", None) is None and value.is_floating_point():
            value = value.to(compute_dtype)  # unquantised tensors (biases, norms) run in the compute dtype
        module._parameters[name] = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(
            value, requires_grad=False
        )  # fmt: skip
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise ValueError(f"GGUF file lacks weights the architecture needs: {', '.join(missing[:5])}")
    setattr(model, _MARK, True)
    return model


# ---------------------------------------------------------------------------- description


def _tensor_kind(tensor: torch.Tensor) -> str:
    quant_type = getattr(tensor, "quant_type", None)
    if quant_type is not None:
        import gguf

        name = gguf.GGMLQuantizationType(quant_type).name
        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(name, f"gguf:{name}")
    return str(tensor.dtype).removeprefix("torch.")


def values_by_storage(module: Any) -> dict[str, int]:
    """How many weight values a model holds in each storage kind (a GGUF tensor's values, not its bytes)."""
    counts: dict[str, int] = {}
    for parameter in module.parameters() if hasattr(module, "parameters") else ():
        kind = _tensor_kind(parameter)
        count = 1
        for size in logical_shape(parameter):
            count *= int(size)
        counts[kind] = counts.get(kind, 0) + count
    return counts


def storage_dtype(module: Any) -> str | None:
    """What most of a model's weight values are stored as now (``float8_e4m3fn``, ``gguf:Q8_0``, ``float32``…)."""
    counts = values_by_storage(module)
    return max(counts, key=counts.__getitem__) if counts else None


def resident_bytes(modules: Iterable[Any]) -> int:
    """Bytes of the modules' parameters and buffers as they are held (float8 1, GGUF its blocks' bytes)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if not hasattr(module, "parameters"):
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total
