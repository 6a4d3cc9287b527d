"""float8 and GGUF copies of a tiny model's files, as ComfyUI users have Flux and T5 (tests and benchmarks).

- :func:`export_float8`: a safetensors file with its matrices (2-D and wider tensors) stored in
  ``float8_e4m3fn`` and its vectors (biases, norm scales) left as they are, as mixed files come;
- :func:`export_gguf`: a GGUF file (city96's layout for ComfyUI-GGUF: the original tensor names,
  matrices quantised, vectors in F32) written with the ``gguf`` package's own quantiser;
- :func:`export_upcast_reference`: what a stored file holds, upcast to float32 at load into a
  plain safetensors file: the reference the per-layer upcasting must reproduce exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["export_float8", "export_gguf", "export_upcast_reference"]


def _load(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def export_float8(source: str | Path, path: str | Path, dtype: torch.dtype = torch.float8_e4m3fn) -> Path:
    """``source``'s matrices stored in ``dtype``, its vectors unchanged."""
    from safetensors.torch import save_file

    state = {
        key: value.to(dtype) if value.is_floating_point() and value.ndim >= 2 else value
        for key, value in _load(source).items()
    }
    save_file(state, str(path))
    return Path(path)


def export_gguf(source: str | Path, path: str | Path, quant_type: str = "Q8_0", arch: str = "flux") -> Path:
    """``source``'s 2-D tensors quantised to ``quant_type`` (when their rows fit its blocks), the rest F32."""
    import gguf

    kind = gguf.GGMLQuantizationType[quant_type]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in _load(source).items():
        data = value.float().numpy()
        if data.ndim == 2 and data.shape[-1] % block == 0:
            writer.add_tensor(key, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(key, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def export_upcast_reference(stored: str | Path, path: str | Path) -> Path:
    """The values a float8 or GGUF file holds, as float32 tensors in a safetensors file."""
    from safetensors.torch import save_file

    stored = Path(stored)
    if stored.suffix == ".gguf":
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        from deployments.families.weight_storage import read_gguf

        state = {
            key: (dequantize_gguf_tensor(value) if getattr(value, "quant_type", None) is not None else value)
            .float().contiguous().clone()
            for key, value in read_gguf(stored).items()
        }  # fmt: skip
    else:
        state = {key: value.float() if value.is_floating_point() else value for key, value in _load(stored).items()}
    save_file(state, str(path))
    return Path(path)
