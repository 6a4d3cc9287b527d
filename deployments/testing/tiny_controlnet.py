"""A tiny ControlNet built from the tiny SD 1.x UNet (``ControlNetModel.from_unet``), random weights.

``from_unet`` copies the UNet's encoder and zero-initialises the ControlNet's output
convolutions (``controlnet_down_blocks``, ``controlnet_mid_block``) and the hint embedding's last
convolution, so a freshly made ControlNet adds exactly nothing. A trained one does not: the
builder draws those weights at random (seeded), so its residuals are large enough for tests to
see where and how strongly they reach the UNet. Saved as a diffusers folder, the format real
ControlNets (``lllyasviel/control_v11f1e_sd15_tile``…) come in.
"""

from __future__ import annotations

from pathlib import Path

import torch

SEED = 7
ZERO_INITIALISED_STD = 0.05


def build_tiny_controlnet(directory: Path) -> dict[str, str]:
    """Build into ``directory`` (a staging folder beside the ``sd`` component, which it reuses)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from deployments.testing.build_tiny_models import build_component

    directory = Path(directory).resolve()
    sd = build_component("sd", directory.parent / "sd")
    unet = UNet2DConditionModel.from_pretrained(sd["pipeline"], subfolder="unet")
    torch.manual_seed(SEED)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        zeroed = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        zeroed.append(controlnet.controlnet_cond_embedding.conv_out)
        for module in zeroed:
            module.weight.normal_(0.0, ZERO_INITIALISED_STD)
            module.bias.normal_(0.0, ZERO_INITIALISED_STD)
    controlnet.save_pretrained(directory / "sd15-controlnet", safe_serialization=True)
    return {"sd15": str(directory / "sd15-controlnet")}
