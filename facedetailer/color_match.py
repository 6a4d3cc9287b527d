"""Matching a refined crop's colours to the original crop in CIE Lab (a seam option, off by default).

The inpainter's VAE round trip and sampling shift a face's tone and brightness (users' most common
complaint, reference notes §15 #1). The refined crop is mapped so that its colour statistics equal
the original crop's over the same pixels: the face mask and a ring of context around it. The two
regions weigh equally, so a large face does not drown out the skin and background at its edge,
where a seam shows. The map is computed per crop and per Lab channel:

- ``mean_std``: Reinhard-style, ``(x − μ_refined)·σ_original/σ_refined + μ_original``;
- ``histogram``: the weighted quantile map from the refined crop's distribution to the original's.

``strength`` interpolates in Lab between the refined crop (0) and the fully matched one (1).
Lab conversions are scikit-image's (D65).
"""

from __future__ import annotations

import warnings
from typing import Literal

import cv2
import numpy as np
from skimage import color

ColorMatchMethod = Literal["none", "mean_std", "histogram"]
COLOR_MATCH_METHODS: tuple[str, ...] = ("none", "mean_std", "histogram")

RING_WEIGHT = 0.5  # share of the statistics taken over the ring (the rest over the face)
RING_FRACTION = 0.15  # ring width as a fraction of the face's size (√ of its mask area)
MIN_RING_WIDTH = 4  # px
MIN_STD = 1e-3  # Lab units: a channel flatter than this is only shifted, not scaled
STD_RATIO_LIMITS = (1 / 3, 3.0)  # keeps a nearly flat refined channel from being blown up into noise


def context_ring(face: np.ndarray, width: int) -> np.ndarray:
    """Pixels outside the boolean ``face`` mask within ``width`` px of it (Euclidean), inside the crop."""
    if width <= 0 or not face.any():
        return np.zeros_like(face, dtype=bool)
    outside = np.ascontiguousarray(~face, dtype=np.uint8)
    distance = cv2.distanceTransform(outside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return (distance > 0) & (distance <= width)


def ring_width(face: np.ndarray) -> int:
    """Default ring width: RING_FRACTION of the face's size, at least MIN_RING_WIDTH px."""
    return max(MIN_RING_WIDTH, round(RING_FRACTION * float(np.sqrt(np.count_nonzero(face)))))


def statistics_weights(face_mask: np.ndarray, paste_mask: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel weights of the statistics: half on the face, half on its ring, each spread evenly.

    The face is ``face_mask ≥ 0.5``; the ring is :func:`context_ring` of the default width, widened
    to every pixel outside the face that the paste mask reaches, so the statistics see all the
    pixels the match will change. Weights sum to 1 (all on the face when there is no ring).
    """
    face = np.asarray(face_mask) >= 0.5
    weights = np.zeros(face.shape, np.float64)
    if not face.any():
        return weights
    ring = context_ring(face, ring_width(face))
    if paste_mask is not None:
        ring |= (np.asarray(paste_mask) > 0) & ~face
    if not ring.any():
        weights[face] = 1.0 / np.count_nonzero(face)
        return weights
    weights[face] = (1 - RING_WEIGHT) / np.count_nonzero(face)
    weights[ring] = RING_WEIGHT / np.count_nonzero(ring)
    return weights


def _to_unit_float(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image[..., :3].astype(np.float64) / 255.0
    return np.clip(np.asarray(image[..., :3], dtype=np.float64), 0.0, 1.0)


def _from_unit_float(rgb: np.ndarray, like: np.ndarray) -> np.ndarray:
    rgb = np.clip(rgb, 0.0, 1.0)
    if like.dtype == np.uint8:
        out = np.rint(rgb * 255.0).astype(np.uint8)
    else:
        out = rgb.astype(like.dtype)
    if like.shape[-1] > 3:  # keep any extra channel (alpha) as it was
        out = np.concatenate([out, like[..., 3:]], axis=-1)
    return out


def _weighted_mean_std(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel weighted mean and standard deviation of ``values`` [N, C] with ``weights`` [N] summing to 1."""
    mean = weights @ values
    variance = weights @ (values - mean) ** 2
    return mean, np.sqrt(np.maximum(variance, 0.0))


def _mean_std_map(source: np.ndarray, reference: np.ndarray, weights: np.ndarray, lab: np.ndarray) -> np.ndarray:
    mean_s, std_s = _weighted_mean_std(source, weights)
    mean_r, std_r = _weighted_mean_std(reference, weights)
    ratio = np.where(std_s > MIN_STD, std_r / np.maximum(std_s, MIN_STD), 1.0)
    ratio = np.clip(ratio, *STD_RATIO_LIMITS)
    return (lab - mean_s) * ratio + mean_r


def _weighted_cdf(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct sorted values and the weighted CDF at each, taken at the middle of its step."""
    unique, inverse = np.unique(values, return_inverse=True)
    mass = np.bincount(inverse.ravel(), weights=weights, minlength=unique.size)
    cdf = np.cumsum(mass) - 0.5 * mass
    return unique, cdf / mass.sum()


def _histogram_map(source: np.ndarray, reference: np.ndarray, weights: np.ndarray, lab: np.ndarray) -> np.ndarray:
    matched = np.empty_like(lab)
    for channel in range(lab.shape[-1]):
        source_values, source_cdf = _weighted_cdf(source[:, channel], weights)
        reference_values, reference_cdf = _weighted_cdf(reference[:, channel], weights)
        quantile = np.interp(lab[..., channel], source_values, source_cdf)
        matched[..., channel] = np.interp(quantile, reference_cdf, reference_values)
    return matched


def match_colors(
    refined: np.ndarray,
    original: np.ndarray,
    face_mask: np.ndarray,
    *,
    method: ColorMatchMethod,
    strength: float = 1.0,
    paste_mask: np.ndarray | None = None,
) -> np.ndarray:
    """``refined`` with its Lab statistics over face + ring matched to ``original``'s; same dtype.

    ``refined`` and ``original`` are crops of the same size (uint8, or float in [0, 1]);
    ``face_mask`` and ``paste_mask`` are float masks of that size. The whole crop is mapped (the
    map is one per crop), but only pixels the paste mask reaches make it into the image. With
    ``method="none"`` or ``strength == 0`` the crop comes back unchanged (same object).
    """
    if method not in COLOR_MATCH_METHODS:
        raise ValueError(f"color_match must be one of {', '.join(COLOR_MATCH_METHODS)}, got {method!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"color_match_strength must be in 0 … 1, got {strength}")
    if method == "none" or strength == 0.0:
        return refined
    if refined.shape != original.shape or refined.shape[:2] != np.shape(face_mask)[:2]:
        raise ValueError(f"refined {refined.shape}, original {original.shape} and mask {np.shape(face_mask)} differ")
    weights = statistics_weights(face_mask, paste_mask)
    region = weights > 0
    if not region.any():
        return refined
    refined_lab = color.rgb2lab(_to_unit_float(refined))
    original_lab = color.rgb2lab(_to_unit_float(original))
    source, reference, region_weights = refined_lab[region], original_lab[region], weights[region]
    if method == "mean_std":
        matched = _mean_std_map(source, reference, region_weights, refined_lab)
    else:
        matched = _histogram_map(source, reference, region_weights, refined_lab)
    out_lab = refined_lab + strength * (matched - refined_lab)
    out_lab[..., 0] = np.clip(out_lab[..., 0], 0.0, 100.0)
    with warnings.catch_warnings():  # colours mapped outside sRGB are clipped, which is what we want
        warnings.filterwarnings("ignore", message="Conversion from CIE-LAB", category=UserWarning)
        rgb = color.lab2rgb(out_lab)
    return _from_unit_float(rgb, refined)
