"""Feathering, pasting and resizing crops (spec §6, reference §6.3, §6.8, §7.1–7.3).

Beyond the reference, :func:`blend_face` offers the seam options (off by default): colour matching
(:mod:`facedetailer.color_match`) and multi-band blending (:func:`multiband_paste`).
"""

from __future__ import annotations

import math
from typing import Literal

import cv2
import numpy as np
from PIL import Image

from facedetailer.color_match import ColorMatchMethod, match_colors
from facedetailer.segs import CropRegion

BlendMode = Literal["feather", "multiband"]
BLEND_MODES: tuple[str, ...] = ("feather", "multiband")
MIN_PYRAMID_SIZE = 8  # px: the coarsest pyramid level keeps at least this many on its shorter side
MAX_PYRAMID_LEVELS = 8

FEATHER_SIGMA = 10.0  # fixed in the reference; ``feather`` only sets the kernel width (Q13)


def feather_kernel_size(mask_shape: tuple[int, int], feather: int) -> int:
    """Gaussian kernel width for a mask of ``mask_shape`` (h, w); 0 means no blur (reference §7.1).

    K = 2·feather + 1; if the shorter side ≤ K, K = shorter // 2 made odd; K < 3 → no blur.
    """
    if feather <= 0:
        return 0
    kernel = 2 * int(feather) + 1
    shorter = min(mask_shape[0], mask_shape[1])
    if shorter <= kernel:
        kernel = shorter // 2
        if kernel % 2 == 0:
            kernel += 1
        if kernel < 3:
            return 0
    return kernel


def _gaussian_kernel_1d(size: int) -> np.ndarray:
    """torchvision's GaussianBlur kernel: exp(-x²/2σ²) over linspace(-(K-1)/2, (K-1)/2, K), normalised."""
    x = np.linspace(-(size - 1) / 2, (size - 1) / 2, size)
    weights = np.exp(-0.5 * (x / FEATHER_SIGMA) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def feather_mask(mask: np.ndarray, feather: int) -> np.ndarray:
    """Blur a float mask as torchvision GaussianBlur(K, σ=10) with reflect padding (REFLECT_101)."""
    source = np.ascontiguousarray(mask, dtype=np.float32)
    kernel_size = feather_kernel_size(source.shape[:2], feather)
    if kernel_size == 0:
        return source.copy()
    kernel = _gaussian_kernel_1d(kernel_size)
    blurred = cv2.sepFilter2D(source, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_REFLECT_101)
    return np.clip(blurred, 0.0, 1.0)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear float resize to (width, height), half-pixel centres like torch ``align_corners=False``."""
    source = np.ascontiguousarray(mask, dtype=np.float32)
    if (source.shape[1], source.shape[0]) == tuple(size):
        return source.copy()
    return cv2.resize(source, tuple(size), interpolation=cv2.INTER_LINEAR)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lanczos resize to (width, height) through 8-bit PIL, as the reference's ``tensor_resize``.

    uint8 in → uint8 out. Float in [0, 1] is quantised as ``clip(255·x).astype(uint8)`` (truncating)
    and comes back as float32 /255, so even a same-size resize quantises, as in the reference.
    """
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize(tuple(size), resample=Image.Resampling.LANCZOS))
    quantised = np.clip(255.0 * np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
    resized = Image.fromarray(quantised).resize(tuple(size), resample=Image.Resampling.LANCZOS)
    return np.asarray(resized).astype(np.float32) / np.float32(255.0)


def to_comfy_float(image: np.ndarray) -> np.ndarray:
    """uint8 → float32 in [0, 1] as ComfyUI's LoadImage makes its IMAGE (``x.astype(float32) / 255``)."""
    return image.astype(np.float32) / np.float32(255.0)


def save_image_bytes(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] → uint8 as ComfyUI's SaveImage converts it: ``clip(255·x, 0, 255)``, truncated.

    Exact on ComfyUI's own floats: ``save_image_bytes(to_comfy_float(x)) == x`` for every byte.
    """
    return np.clip(np.float32(255.0) * image.astype(np.float32, copy=False), 0, 255).astype(np.uint8)


def _check_paste(image: np.ndarray, refined: np.ndarray, crop_region: CropRegion) -> None:
    x1, y1, x2, y2 = crop_region
    height, width = image.shape[:2]
    if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
        raise ValueError(f"crop region {crop_region} is not inside a {width}x{height} image")
    if refined.shape[:2] != (y2 - y1, x2 - x1) or refined.shape[2:] != image.shape[2:]:
        raise ValueError(f"refined crop shape {refined.shape} does not fit region {crop_region} of {image.shape}")
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"images must be uint8 or float, got {image.dtype}")
    if (image.dtype == np.uint8) != (refined.dtype == np.uint8):
        raise TypeError(f"refined dtype {refined.dtype} does not match image dtype {image.dtype}")


def paste(image: np.ndarray, refined: np.ndarray, mask: np.ndarray, crop_region: CropRegion) -> np.ndarray:
    """``(1 − m)·image + m·refined`` inside the crop region, on a copy (reference §7.2).

    Pixels where m == 0 keep their exact original value. uint8 images are blended as ComfyUI
    blends its float IMAGE (``tensor_paste`` on x/255 in float32) and brought back to 8 bits as
    its SaveImage does, ``clip(255·x).astype(uint8)``: truncation (Decision 11). The mask is
    resized bilinearly if its size differs from the crop.
    """
    _check_paste(image, refined, crop_region)
    x1, y1, x2, y2 = crop_region
    weight = resize_mask(mask, (x2 - x1, y2 - y1))
    if image.ndim == 3:
        weight = weight[..., None]
    original = image[y1:y2, x1:x2]
    if image.dtype == np.uint8:
        blended = save_image_bytes((1 - weight) * to_comfy_float(original) + weight * to_comfy_float(refined))
    else:
        work_dtype = np.float64 if image.dtype == np.float64 else np.float32
        blended = (1 - weight) * original.astype(work_dtype) + weight * refined.astype(work_dtype)
    result = image.copy()
    result[y1:y2, x1:x2] = np.where(weight == 0, original, blended.astype(image.dtype))
    return result


def rgba_with_alpha(refined: np.ndarray, alpha_mask: np.ndarray) -> np.ndarray:
    """The refined crop as RGBA with alpha = the paste mask (the cropped_enhanced_alpha output)."""
    height, width = refined.shape[:2]
    alpha = np.clip(resize_mask(alpha_mask, (width, height)), 0.0, 1.0)
    if refined.dtype == np.uint8:
        alpha_channel = np.rint(alpha * 255).astype(np.uint8)
    else:
        alpha_channel = alpha.astype(refined.dtype)
    return np.concatenate([refined[..., :3], alpha_channel[..., None]], axis=-1)


def pyramid_levels(crop_shape: tuple[int, int]) -> int:
    """Laplacian levels for a crop (h, w): halve until the shorter side would drop below MIN_PYRAMID_SIZE.

    0 (a crop under 16 px) means plain feathering.
    """
    shorter = min(crop_shape[0], crop_shape[1])
    if shorter < 2 * MIN_PYRAMID_SIZE:
        return 0
    return min(MAX_PYRAMID_LEVELS, int(math.floor(math.log2(shorter / MIN_PYRAMID_SIZE))))


def _gaussian_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    pyramid = [image]
    for _ in range(levels):
        pyramid.append(cv2.pyrDown(pyramid[-1], borderType=cv2.BORDER_REFLECT_101))
    return pyramid


def _expand(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    return cv2.pyrUp(image, dstsize=(like.shape[1], like.shape[0]), borderType=cv2.BORDER_REFLECT_101)


def crop_edge_window(crop_region: CropRegion, image_shape: tuple[int, int], width: int) -> np.ndarray:
    """1 inside the crop, falling smoothly to 0 on each crop edge that has image pixels beyond it.

    Multi-band blending spreads low frequencies beyond the mask; this keeps the crop's edge
    continuous with the untouched image around it (no square). Edges on the image border keep 1.
    """
    x1, y1, x2, y2 = crop_region
    height, width_px = y2 - y1, x2 - x1
    distance = np.full((height, width_px), np.inf, np.float32)
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width_px, dtype=np.float32)[None, :]
    if y1 > 0:
        distance = np.minimum(distance, rows)
    if y2 < image_shape[0]:
        distance = np.minimum(distance, height - 1 - rows)
    if x1 > 0:
        distance = np.minimum(distance, cols)
    if x2 < image_shape[1]:
        distance = np.minimum(distance, width_px - 1 - cols)
    t = np.clip(distance / max(width, 1), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)  # smoothstep


def multiband_paste(
    image: np.ndarray,
    refined: np.ndarray,
    mask: np.ndarray,
    crop_region: CropRegion,
    levels: int | None = None,
) -> np.ndarray:
    """Laplacian-pyramid (Burt–Adelson) blend of ``refined`` into the crop region, on a copy.

    Band k of the refined crop is blended under level k of the mask's Gaussian pyramid, so fine
    detail changes over the feathered mask's width and the colour and brightness (coarse bands)
    over a wider, gentler transition. Written as ``original + W·Σ_k expand(G_k(m)·L_k(refined −
    original))`` with ``W = max(m, edge window)`` (:func:`crop_edge_window`, reach 2^levels px):
    pixels outside the crop region never change, nor do crop-edge pixels the mask does not reach,
    but pixels near the mask (within about 2^levels px) may. ``levels`` defaults to
    :func:`pyramid_levels` of the crop; 0 is the plain paste.
    """
    _check_paste(image, refined, crop_region)
    x1, y1, x2, y2 = crop_region
    crop_shape = (y2 - y1, x2 - x1)
    levels = pyramid_levels(crop_shape) if levels is None else levels
    if levels <= 0:
        return paste(image, refined, mask, crop_region)
    work_dtype = np.float64 if image.dtype == np.float64 else np.float32
    weight = resize_mask(mask, (crop_shape[1], crop_shape[0])).astype(work_dtype)
    original = image[y1:y2, x1:x2].astype(work_dtype)
    difference = refined.astype(work_dtype) - original
    difference_pyramid = _gaussian_pyramid(difference, levels)
    mask_pyramid = _gaussian_pyramid(weight, levels)
    channels = (...,) if difference.ndim == 2 else (..., None)
    correction = mask_pyramid[levels][channels] * difference_pyramid[levels]
    for level in range(levels - 1, -1, -1):
        band = difference_pyramid[level] - _expand(difference_pyramid[level + 1], difference_pyramid[level])
        correction = _expand(correction, band) + mask_pyramid[level][channels] * band
    reach = min(2**levels, max(1, min(crop_shape) // 4))
    window = np.maximum(weight, crop_edge_window(crop_region, image.shape[:2], reach))
    blended = original + window[channels] * correction
    if image.dtype == np.uint8:
        blended = np.clip(np.rint(blended), 0, 255)
    result = image.copy()
    result[y1:y2, x1:x2] = blended.astype(image.dtype)
    return result


def blend_face(
    image: np.ndarray,
    refined: np.ndarray,
    paste_mask: np.ndarray,
    crop_region: CropRegion,
    *,
    face_mask: np.ndarray | None = None,
    color_match: ColorMatchMethod = "none",
    color_match_strength: float = 1.0,
    blend: BlendMode = "feather",
) -> tuple[np.ndarray, np.ndarray]:
    """Paste one refined crop with the seam options; returns (image, the crop as pasted).

    With ``color_match="none"`` and ``blend="feather"`` this is exactly :func:`paste` (the
    reference). Colour matching maps the refined crop to the original crop under ``face_mask``
    (the SEG's cropped mask; the paste mask's ≥ 0.5 part if not given) and a ring around it.
    """
    if blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)}, got {blend!r}")
    if color_match != "none":
        x1, y1, x2, y2 = crop_region
        _check_paste(image, refined, crop_region)
        crop_mask = resize_mask(paste_mask, (x2 - x1, y2 - y1))
        face = crop_mask if face_mask is None else resize_mask(face_mask, (x2 - x1, y2 - y1))
        refined = match_colors(
            refined,
            image[y1:y2, x1:x2],
            face,
            method=color_match,
            strength=color_match_strength,
            paste_mask=crop_mask,
        )
    if blend == "multiband":
        return multiband_paste(image, refined, paste_mask, crop_region), refined
    return paste(image, refined, paste_mask, crop_region), refined
