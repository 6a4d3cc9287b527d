"""A ControlNet evaluation's cost relative to a UNet evaluation: the factor ``max_work_units`` uses.

Counts the floating-point operations of one forward pass of diffusers' SD 1.5 and SDXL UNets and of
``ControlNetModel.from_unet`` of each (cond and uncond rows, 77-token context), on torch's meta
device with ``torch.utils.flop_counter`` — no weights, no memory, seconds of CPU. The figures are
written up in docs/limits-and-errors.md (serve_app/limits.py: ``CONTROLNET_WORK``).

    python benchmarks/controlnet_flops.py
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

SD15: dict[str, Any] = {
    "sample_size": 64,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SDXL: dict[str, Any] = {
    "sample_size": 128,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def flops(module: torch.nn.Module, **inputs: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        module(**inputs)
    return counter.get_total_flops()


def main() -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    print("| model | crop | UNet TFLOP | ControlNet TFLOP | ratio |\n|---|---|---|---|---|")
    for name, config in (("SD 1.5", SD15), ("SDXL", SDXL)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=2, **config)
            controlnet = ControlNetModel.from_unet(unet)
        for latent in (64, 128):
            inputs: dict[str, Any] = {
                "sample": torch.zeros(2, 4, latent, latent, device="meta"),
                "timestep": torch.zeros(2, device="meta"),
                "encoder_hidden_states": torch.zeros(2, 77, config["cross_attention_dim"], device="meta"),
            }
            if config.get("addition_embed_type") == "text_time":
                inputs["added_cond_kwargs"] = {
                    "text_embeds": torch.zeros(2, 1280, device="meta"),
                    "time_ids": torch.zeros(2, 6, device="meta"),
                }
            unet_flops = flops(unet, **inputs)
            control = torch.zeros(2, 3, latent * 8, latent * 8, device="meta")
            control_flops = flops(controlnet, controlnet_cond=control, **inputs)
            print(f"| {name} | {latent * 8}² | {unet_flops / 1e12:.2f} | {control_flops / 1e12:.2f} "
                  f"| {control_flops / unet_flops:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
