"""The lean ResNet-block forward computes diffusers' bits exactly (it only saves memory traffic)."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D

from deployments.families.lean_forward import LeanGEGLU, LeanResnetBlock2D, use_lean_forward
from deployments.testing.tiny_sd import _unet, _vae


def _seeded(build: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():  # random biases and norms too, so every term of the block matters
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return model.eval().requires_grad_(False)


def test_the_vae_encodes_and_decodes_the_same_bits_with_the_lean_blocks() -> None:
    plain = _seeded(_vae)
    lean = copy.deepcopy(plain)
    changed = use_lean_forward(lean)
    blocks = [module for module in plain.modules() if type(module) is ResnetBlock2D]
    assert changed == len(blocks) > 0
    assert any(block.conv_shortcut is not None for block in blocks)  # the 8 → 16 channel shortcut is covered
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        latent = plain.encode(pixels).latent_dist.mean
        assert torch.equal(lean.encode(pixels).latent_dist.mean, latent)
        assert torch.equal(lean.decode(latent).sample, plain.decode(latent).sample)


def test_the_unet_blocks_with_a_time_embedding_give_the_same_bits() -> None:
    plain = _seeded(_unet)
    lean = copy.deepcopy(plain)
    assert use_lean_forward(lean) > 0
    assert any(type(module) is LeanResnetBlock2D for module in lean.modules())
    assert any(type(module) is LeanGEGLU for module in lean.modules())  # the transformer blocks' feed-forward
    generator = torch.Generator().manual_seed(2)
    sample, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 7, 32, generator=generator)
    timesteps = torch.tensor([999.0, 10.0])
    with torch.no_grad():
        expected = plain(sample, timesteps, encoder_hidden_states=context).sample
        assert torch.equal(lean(sample, timesteps, encoder_hidden_states=context).sample, expected)


def test_with_gradients_or_in_training_the_block_runs_diffusers_own_forward() -> None:
    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=None, groups=4).eval()
    use_lean_forward(block)
    assert type(block) is LeanResnetBlock2D
    inputs = torch.randn(1, 8, 6, 6, requires_grad=True)
    block(inputs, None).sum().backward()  # in-place ops on a graph would raise here
    assert inputs.grad is not None


def test_geglu_gives_the_same_bits_and_keeps_diffusers_forward_with_gradients() -> None:
    torch.manual_seed(3)
    plain = GEGLU(16, 24).eval()
    lean = copy.deepcopy(plain)
    assert use_lean_forward(lean) == 1 and type(lean) is LeanGEGLU
    inputs = torch.randn(2, 5, 16)
    with torch.inference_mode():
        assert torch.equal(lean(inputs), plain(inputs))
    graph_inputs = inputs.clone().requires_grad_(True)
    lean(graph_inputs).sum().backward()  # an in-place product on a graph would raise here
    assert graph_inputs.grad is not None


@pytest.mark.parametrize(
    "changes", [{"output_scale_factor": 2.0}, {"time_embedding_norm": "scale_shift"}, {"down": True}]
)
def test_blocks_the_lean_forward_does_not_reproduce_are_left_alone(changes: dict) -> None:
    block = ResnetBlock2D(in_channels=8, temb_channels=16, groups=4, **changes)
    assert use_lean_forward(block) == 0 and type(block) is ResnetBlock2D
