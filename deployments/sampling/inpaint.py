"""The extra UNet input of a 9-channel inpainting checkpoint, as ComfyUI's ``BaseModel.concat_cond``.

An SD inpainting UNet takes [latent (4), mask (1), masked-image latent (4)]. The engine concatenates
this to each :class:`~deployments.sampling.UNetRequest`'s ``x_in`` (it does not change during a run).

- With ``InpaintModelConditioning`` (``concat_mask`` and ``concat_latent`` given): its mask, resized
  to the latent grid and rounded, and the VAE latent of the image with the mask > 0.5 area set to
  grey (in the model's latent space).
- Without it but with a noise mask: ComfyUI falls back to the noise mask (rounded) and the
  ORIGINAL latent being sampled.
- Without any mask: a mask of ones and the latent of a grey image ("everything may change").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["BLANK_INPAINT_LATENT", "center_crop_to_aspect", "inpaint_concat"]

# ComfyUI's blank_inpaint_image_like: an all-grey (0 in [-1, 1]) image in SD 1.x/2.x latent space.
BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def center_crop_to_aspect(samples: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre cut of ComfyUI's ``common_upscale(…, "center")``: [..., H, W] cropped to the aspect of
    ``height``×``width`` (the resize that follows is the caller's)."""
    old_height, old_width = samples.shape[-2:]
    old_aspect, new_aspect = old_width / old_height, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
    return samples.narrow(-2, y, old_height - y * 2).narrow(-1, x, old_width - x * 2)


def _center_resize(samples: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``common_upscale(…, "bilinear", "center")``: crop to the target aspect ratio, then bilinear."""
    cropped = center_crop_to_aspect(samples, height, width)
    return F.interpolate(cropped, size=(height, width), mode="bilinear")


def inpaint_concat(
    latent_image: torch.Tensor,
    noise_mask: torch.Tensor | None = None,
    *,
    concat_mask: torch.Tensor | None = None,
    concat_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """[1, 5, h, w]: the rounded mask and the masked-image latent for ``latent_image`` [1, 4, h, w]."""
    height, width = latent_image.shape[-2:]
    mask = concat_mask if concat_mask is not None else noise_mask
    if mask is None:
        blank = torch.ones_like(latent_image)
        for channel, value in enumerate(BLANK_INPAINT_LATENT):
            blank[:, channel] *= value
        return torch.cat([torch.ones_like(latent_image)[:, :1], blank], dim=1)
    image = concat_latent if concat_latent is not None else latent_image
    if tuple(image.shape[1:]) != tuple(latent_image.shape[1:]):
        image = _center_resize(image, height, width)
    mask = torch.as_tensor(mask, dtype=torch.float32).to(latent_image.device)
    mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:]))
    if tuple(mask.shape[-2:]) != (height, width):
        mask = _center_resize(mask, height, width)
    return torch.cat([mask.round(), image.to(latent_image.device)], dim=1)
