"""How visible the seam of a paste is, as numbers: for tests and the quality benchmark.

For a result, its source image and the paste mask (image-sized, in [0, 1]), the paste-mask
boundary is its transition (``ε < m < 1 − ε``, or the edge itself for a hard mask). The inner band
is the ``band_width`` px of fully pasted pixels (``m ≥ 1 − ε``) next to it, the outer band the
``band_width`` px of untouched ones (``m ≤ ε``).

- **Boundary ΔE₀₀** (colour step): in each tile that holds both bands (``block`` px, widened to
  twice the transition's width plus both bands for wide feathers), the
  result's inner-band mean colour (Lab) is compared with what the source's own step across the
  boundary predicts from the result's outer band: ``ΔE₀₀(R_in, R_out + S_in − S_out)``. It is 0
  when the paste keeps the step the source had (however different face and background are) and
  equals the cast of a uniformly cast paste. Tiles are averaged by their band pixel counts, so
  errors in opposite directions on two sides of a face do not cancel.
- **Gradient excess** (edge energy): the mean ``Σ_c |∇Lab_c|²`` over the boundary zone (both
  bands and the transition) in the result, against the source's:
  ``(E_result − E_source) / max(E_source, 1)``; 0 = no more edge energy than the source had.

Lab and ΔE₀₀ are scikit-image's (D65, CIEDE2000 with kL = kC = kH = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage import color

from facedetailer.blend import resize_mask
from facedetailer.segs import CropRegion

EPSILON = 0.01  # mask levels within this of 0 or 1 count as untouched / fully pasted
DEFAULT_BAND_WIDTH = 4  # px
DEFAULT_BLOCK = 16  # px
MIN_ENERGY = 1.0  # (ΔLab per px)²: floor of the source energy in the relative excess


@dataclass(frozen=True)
class SeamScore:
    """The seam metric of one result (see the module docstring)."""

    delta_e: float  # boundary ΔE₀₀, NaN when no tile holds both bands
    gradient_energy: float  # mean Σ|∇Lab|² over the boundary zone, result
    source_gradient_energy: float  # the same in the source
    gradient_excess: float  # (result − source) / max(source, MIN_ENERGY)
    inner_pixels: int
    outer_pixels: int


@dataclass(frozen=True)
class SeamBands:
    """Boolean masks, image-sized: fully pasted band, untouched band, and the whole boundary zone."""

    inner: np.ndarray
    outer: np.ndarray
    zone: np.ndarray
    transition_width: float  # px across the transition (median), 0 for a hard mask


def mask_in_image(image_shape: tuple[int, ...], crop_mask: np.ndarray, crop_region: CropRegion) -> np.ndarray:
    """A crop-sized paste mask placed at its crop region on an all-zero image-sized mask."""
    x1, y1, x2, y2 = crop_region
    full = np.zeros(image_shape[:2], np.float32)
    full[y1:y2, x1:x2] = resize_mask(crop_mask, (x2 - x1, y2 - y1))
    return full


def _distance_to(pixels: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of ``pixels`` (0 on them)."""
    if not pixels.any():
        return np.full(pixels.shape, np.inf, np.float32)
    return cv2.distanceTransform(np.ascontiguousarray(~pixels, dtype=np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def seam_bands(paste_mask: np.ndarray, band_width: int = DEFAULT_BAND_WIDTH) -> SeamBands:
    """The inner and outer bands of ``band_width`` px on either side of the paste mask's transition."""
    mask = np.asarray(paste_mask, dtype=np.float32)
    inside = mask >= 1.0 - EPSILON
    outside = mask <= EPSILON
    to_inside, to_outside = _distance_to(inside), _distance_to(outside)
    inner = inside & (_distance_to(~inside) <= band_width)
    outer = outside & (_distance_to(~outside) <= band_width)
    transition = ~inside & ~outside
    across = to_inside[transition] + to_outside[transition]
    width = float(np.median(across[np.isfinite(across)])) if np.isfinite(across).any() else 0.0
    return SeamBands(inner=inner, outer=outer, zone=inner | outer | transition, transition_width=width)


def _lab(image: np.ndarray) -> np.ndarray:
    rgb = image[..., :3]
    if rgb.dtype == np.uint8:
        return color.rgb2lab(rgb)
    return color.rgb2lab(np.clip(rgb.astype(np.float64), 0.0, 1.0))


def _gradient_energy(lab: np.ndarray) -> np.ndarray:
    energy = np.zeros(lab.shape[:2], np.float64)
    for channel in range(3):
        dy, dx = np.gradient(lab[..., channel])
        energy += dx * dx + dy * dy
    return energy


def _block_delta_e(
    result_lab: np.ndarray, source_lab: np.ndarray, inner: np.ndarray, outer: np.ndarray, block: int
) -> float:
    height, width = inner.shape
    columns = -(-width // block)
    tile = (np.arange(height)[:, None] // block) * columns + np.arange(width)[None, :] // block
    tiles = tile.max() + 1

    def sums(band: np.ndarray, lab: np.ndarray) -> np.ndarray:
        ids = tile[band]
        return np.stack([np.bincount(ids, lab[band][:, c], minlength=tiles) for c in range(3)], axis=-1)

    count_in = np.bincount(tile[inner], minlength=tiles).astype(np.float64)
    count_out = np.bincount(tile[outer], minlength=tiles).astype(np.float64)
    both = (count_in > 0) & (count_out > 0)
    if not both.any():
        return float("nan")
    result_in = sums(inner, result_lab)[both] / count_in[both, None]
    result_out = sums(outer, result_lab)[both] / count_out[both, None]
    source_in = sums(inner, source_lab)[both] / count_in[both, None]
    source_out = sums(outer, source_lab)[both] / count_out[both, None]
    expected_in = result_out + (source_in - source_out)
    delta = color.deltaE_ciede2000(result_in, expected_in)
    weight = count_in[both] + count_out[both]
    return float(np.sum(delta * weight) / np.sum(weight))


def seam_metric(
    result: np.ndarray,
    source: np.ndarray,
    paste_mask: np.ndarray,
    *,
    band_width: int = DEFAULT_BAND_WIDTH,
    block: int = DEFAULT_BLOCK,
) -> SeamScore:
    """Boundary ΔE₀₀ and gradient excess of ``result`` pasted over ``source`` through ``paste_mask``.

    Images are RGB uint8 or float in [0, 1] of one size; ``paste_mask`` is image-sized (see
    :func:`mask_in_image`; take the maximum of several faces' masks for a whole image).
    """
    if result.shape != source.shape:
        raise ValueError(f"result {result.shape} and source {source.shape} differ in shape")
    if np.shape(paste_mask) != result.shape[:2]:
        raise ValueError(f"paste mask {np.shape(paste_mask)} is not image-sized {result.shape[:2]}")
    bands = seam_bands(paste_mask, band_width)
    if not bands.zone.any():
        return SeamScore(float("nan"), 0.0, 0.0, 0.0, 0, 0)
    block = max(block, 2 * (int(np.ceil(bands.transition_width)) + 2 * band_width))
    # work on the zone's bounding box (plus a pixel for the gradients), aligned to the tile grid
    rows, cols = np.nonzero(bands.zone)
    top = max(0, (rows.min() - 1) // block * block)
    left = max(0, (cols.min() - 1) // block * block)
    bottom, right = rows.max() + 2, cols.max() + 2
    window = (slice(top, bottom), slice(left, right))
    result_lab, source_lab = _lab(result[window]), _lab(source[window])
    inner, outer, zone = bands.inner[window], bands.outer[window], bands.zone[window]
    energy = float(_gradient_energy(result_lab)[zone].mean())
    source_energy = float(_gradient_energy(source_lab)[zone].mean())
    return SeamScore(
        delta_e=_block_delta_e(result_lab, source_lab, inner, outer, block),
        gradient_energy=energy,
        source_gradient_energy=source_energy,
        gradient_excess=(energy - source_energy) / max(source_energy, MIN_ENERGY),
        inner_pixels=int(np.count_nonzero(bands.inner)),
        outer_pixels=int(np.count_nonzero(bands.outer)),
    )
