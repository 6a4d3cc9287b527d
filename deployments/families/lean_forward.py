"""Inference-only forwards of diffusers' ResNet blocks and GEGLU that compute the same bits with less memory traffic.

diffusers' ``ResnetBlock2D.forward`` allocates a fresh tensor for each SiLU, for the residual sum
and for the division by ``output_scale_factor`` — a division by 1.0 in every SD/SDXL UNet and VAE.
At the VAE's full resolution these are 128-MB tensors: each allocation is a fresh ``mmap`` whose
pages the kernel faults in and zeroes, and each pass streams the tensor through memory again
(docs/performance.md has the profile: ~7 % of an SD VAE encode at 512 px). ComfyUI's own blocks run
the SiLU in place. The forward below applies the same operators in the same order to the same
values — in place where the input is a temporary, and without the division when the factor is 1.0
(``x / 1.0 == x`` exactly; ``a + b == b + a`` exactly) — so its output is bit-identical to
diffusers' (tests/deployments/test_lean_forward.py). The UNet's GEGLU feed-forward likewise
multiplies into its GELU's fresh output instead of allocating the product (``a * b == b * a``
exactly): 3 % of an SD 1.5 UNet step with the ResNet blocks on this CPU (docs/performance.md).
Both run only under ``torch.no_grad`` / ``inference_mode`` in eval mode; anything else falls back
to diffusers' own forward.
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D
from torch import nn
from torch.nn import functional


class LeanResnetBlock2D(ResnetBlock2D):
    """``ResnetBlock2D`` whose inference forward works in place (same bits, fewer full-size tensors)."""

    def forward(
        self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args: object, **kwargs: object
    ) -> torch.Tensor:
        if self.training or torch.is_grad_enabled() or args or kwargs:
            return super().forward(input_tensor, temb, *args, **kwargs)
        hidden = functional.silu(self.norm1(input_tensor), inplace=True)
        hidden = self.conv1(hidden)
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            hidden = hidden + self.time_emb_proj(temb)[:, :, None, None]
        hidden = functional.silu(self.norm2(hidden), inplace=True)
        hidden = self.conv2(self.dropout(hidden))
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return hidden.add_(shortcut)


class LeanGEGLU(GEGLU):
    """``GEGLU`` whose inference forward multiplies in place into the GELU's output (same bits)."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if (
            self.training
            or torch.is_grad_enabled()
            or args
            or kwargs
            or hidden_states.device.type not in ("cpu", "cuda")
        ):
            return super().forward(hidden_states, *args, **kwargs)
        hidden, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return self.gelu(gate).mul_(hidden)


def _leanable(module: nn.Module) -> bool:
    """Blocks whose diffusers forward the lean one reproduces exactly (the plain SD/SDXL ResNet block)."""
    return (
        type(module) is ResnetBlock2D
        and module.upsample is None
        and module.downsample is None
        # "default" adds the time embedding before norm2; any other name but scale_shift (the VAE
        # decoder's "group") just normalises when there is no time embedding
        and (
            module.time_embedding_norm == "default"
            or (module.time_embedding_norm != "scale_shift" and module.time_emb_proj is None)
        )
        and module.output_scale_factor == 1.0
        and type(module.nonlinearity) is nn.SiLU
    )


def use_lean_forward(model: nn.Module) -> int:
    """Give every plain ResNet block and GEGLU of ``model`` the lean forward; returns how many modules changed."""
    changed = 0
    for module in model.modules():
        if _leanable(module):
            module.__class__ = LeanResnetBlock2D
            changed += 1
        elif type(module) is GEGLU:
            module.__class__ = LeanGEGLU
            changed += 1
    return changed
