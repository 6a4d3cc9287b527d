"""Feathering, pasting and resizing crops (spec §6, reference §6.3, §6.8, §7.1–7.3)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from facedetailer.segs import CropRegion

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


def paste(image: np.ndarray, refined: np.ndarray, mask: np.ndarray, crop_region: CropRegion) -> np.ndarray:
    """``(1 − m)·image + m·refined`` inside the crop region, on a copy (reference §7.2).

    Pixels where m == 0 keep their exact original value; uint8 images are blended in float and
    rounded back. The mask is resized bilinearly if its size differs from the crop.
    """
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

    weight = resize_mask(mask, (x2 - x1, y2 - y1))
    if image.ndim == 3:
        weight = weight[..., None]
    original = image[y1:y2, x1:x2]
    work_dtype = np.float64 if image.dtype == np.float64 else np.float32
    blended = (1 - weight) * original.astype(work_dtype) + weight * refined.astype(work_dtype)
    if image.dtype == np.uint8:
        blended = np.clip(np.rint(blended), 0, 255)
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
