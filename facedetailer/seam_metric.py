"""How visible the seam of a paste is, as numbers: for tests and the quality benchmark.

For a result, its source image and the paste mask (image-sized, in [0, 1]), the paste-mask
boundary is its transition (``ε < m < 1 − ε``, or the edge itself for a hard mask). The inner band
is the ``band_width`` px of fully pasted pixels (``m ≥ 1 − ε``) next to it, the outer band the
``band_width`` px of untouched ones (``m ≤ ε``). Both measures work tile by tile along the boundary
(a pixel belongs to the ``block``-px grid cell of its nearest boundary point, so a tile holds both
sides of one stretch of boundary), so that errors on two sides of a face do not cancel, and
compare the result with the source, so that the source's own contrast across the boundary (face
against hair or background) does not count.

- **Boundary ΔE₀₀** (colour step): per tile, the result's inner-band mean colour (Lab) against
  what the source's own step predicts from the result's outer band:
  ``ΔE₀₀(R_in, R_out + S_in − S_out)``, averaged over tiles by band pixels. It is 0 when the
  paste keeps the source's step and equals the cast of a uniformly cast paste.
- **Gradient excess** (edge energy along the boundary): per tile, the image is averaged along the
  boundary into a profile across it (1-px bins of signed distance to the mask's 0.5 level, over
  the transition and both bands); the energy is the mean ``Σ_c (ΔLab_c per px)²`` of that profile.
  Averaging along the boundary keeps a seam (an edge that follows the boundary) and averages
  texture and noise away. ``(E_result − E_source) / max(E_source, 1)``: 0 = no more edge across the
  boundary than the source had; a hard step of ΔLab over a profile of n bins gives ``|ΔLab|²/(n − 1)``.

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
DEFAULT_BLOCK = 32  # px of boundary per tile
MIN_ENERGY = 1.0  # (ΔLab per px)²: floor of the source energy in the relative excess


@dataclass(frozen=True)
class SeamScore:
    """The seam metric of one result (see the module docstring)."""

    delta_e: float  # boundary ΔE₀₀, NaN when no tile holds both bands
    gradient_energy: float  # mean squared step of the across-boundary profiles, (ΔLab per px)², result
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


def boundary_tiles(paste_mask: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """Each pixel's tile: the ``block``-px grid cell of its nearest point on the mask's 0.5 level.

    Pixels on both sides of one stretch of boundary share a tile, wherever the grid lines fall.
    Returns (tile ids, number of ids); ids are -1 everywhere when the mask never reaches 0.5.
    """
    inside = np.asarray(paste_mask) >= 0.5
    outside_near = cv2.dilate((~inside).astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)))
    boundary = inside & (outside_near > 0)
    if not boundary.any():
        return np.full(inside.shape, -1, np.int64), 0
    _, labels = cv2.distanceTransformWithLabels(
        np.ascontiguousarray(~boundary, dtype=np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    rows, cols = np.nonzero(boundary)
    columns = -(-inside.shape[1] // block)
    tile_of_label = np.zeros(int(labels.max()) + 1, np.int64)
    tile_of_label[labels[boundary]] = (rows // block) * columns + cols // block
    return tile_of_label[labels], int(-(-inside.shape[0] // block) * columns)


def signed_distance(paste_mask: np.ndarray) -> np.ndarray:
    """Signed distance to the mask's 0.5 level in px: +½, +1½, … inside, −½, −1½, … outside."""
    inside = np.asarray(paste_mask) >= 0.5
    return np.where(inside, _distance_to(~inside) - 0.5, 0.5 - _distance_to(inside)).astype(np.float32)


def _profile_energy(lab: np.ndarray, tile: np.ndarray, tiles: int, bins: np.ndarray, reach: int) -> float:
    """Mean squared step between neighbouring bins of each tile's along-boundary mean profile."""
    selected = bins >= 0
    cell = tile[selected] * (2 * reach) + bins[selected]
    cells = tiles * 2 * reach
    counts = np.bincount(cell, minlength=cells).reshape(tiles, 2 * reach)
    profile = np.stack(
        [np.bincount(cell, lab[selected][:, c], minlength=cells).reshape(tiles, 2 * reach) for c in range(3)], axis=-1
    ) / np.maximum(counts, 1)[..., None]
    valid = (counts[:, 1:] > 0) & (counts[:, :-1] > 0)
    if not valid.any():
        return 0.0
    steps = np.sum(np.diff(profile, axis=1) ** 2, axis=-1)
    return float(steps[valid].mean())


def _block_delta_e(
    result_lab: np.ndarray, source_lab: np.ndarray, inner: np.ndarray, outer: np.ndarray, tile: np.ndarray, tiles: int
) -> float:
    inner, outer = inner & (tile >= 0), outer & (tile >= 0)

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
    reach = int(np.ceil(bands.transition_width / 2)) + band_width  # profile bins on each side
    distance = signed_distance(paste_mask)
    profiled = np.abs(distance) < reach
    tile, tiles = boundary_tiles(paste_mask, block)
    # Lab on the bounding box of everything measured only
    rows, cols = np.nonzero(bands.zone | profiled)
    window = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    result_lab, source_lab = _lab(result[window]), _lab(source[window])
    tile = tile[window]
    bins = np.where(profiled[window] & (tile >= 0), np.floor(distance[window]).astype(np.int64) + reach, -1)
    energy = _profile_energy(result_lab, tile, tiles, bins, reach)
    source_energy = _profile_energy(source_lab, tile, tiles, bins, reach)
    return SeamScore(
        delta_e=_block_delta_e(result_lab, source_lab, bands.inner[window], bands.outer[window], tile, tiles),
        gradient_energy=energy,
        source_gradient_energy=source_energy,
        gradient_excess=(energy - source_energy) / max(source_energy, MIN_ENERGY),
        inner_pixels=int(np.count_nonzero(bands.inner)),
        outer_pixels=int(np.count_nonzero(bands.outer)),
    )
