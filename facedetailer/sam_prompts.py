"""SAM prompting and mask selection, without SAM itself (spec §3, reference §4.2–4.4).

The SAM deployment turns each :class:`SamPrompt` into ``predict(point_coords, point_labels, box,
multimask_output=True)``, passes the masks and scores to :func:`select_sam_masks`, and unions
everything with :func:`combine_sam_masks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

import numpy as np

from facedetailer.params import SamDetectionHint, SamNegativeMode
from facedetailer.segs import SEG, SEGS, Box, dilate_mask

Point = tuple[float, float]

GRID_MIN_STEP = 3  # grid steps are max(3, int(size / 20))
OUTER_MARGIN = 10  # Outter grid: px kept clear of the image border and around the crop region
SMALL_BBOX_WIDTH = 10  # mask-points + Small: a bbox narrower than this gets a background point


@dataclass(frozen=True)
class SamPrompt:
    """One SAM call: a box (``None`` for mask-points) and points, label 1 foreground / 0 background."""

    box: Box | None
    points: tuple[Point, ...]
    labels: tuple[int, ...]


def _grid_step(size: int) -> int:
    return max(GRID_MIN_STEP, int(size / 20))


def _center(bbox: Box) -> Point:
    x1, y1, x2, y2 = bbox
    return x1 + (x2 - x1) / 2, y1 + (y2 - y1) / 2


def _expanded_box(bbox: Box, expansion: int, shape: tuple[int, int]) -> Box:
    height, width = shape
    x1, y1, x2, y2 = bbox
    return (
        max(x1 - expansion, 0),
        max(y1 - expansion, 0),
        min(x2 + expansion, width),
        min(y2 + expansion, height),
    )


def _hint_points(hint: str, seg: SEG, box: Box, threshold: float, small_negative: bool) -> list[tuple[Point, int]]:
    """Points of one hint (reference §4.2 table). Thirds use the expanded box, centres the bbox."""
    x1, y1, x2, y2 = box
    cx, cy = _center(seg.bbox)
    gx, gy = (x2 - x1) / 3, (y2 - y1) / 3
    horizontal = [((x1 + gx, cy), 1), ((x1 + 2 * gx, cy), 1)]
    vertical = [((cx, y1 + gy), 1), ((cx, y1 + 2 * gy), 1)]
    if hint in ("center-1", "mask-point-bbox"):  # identical in the reference (Q12)
        return [((cx, cy), 1)]
    if hint == "horizontal-2":
        return horizontal
    if hint == "vertical-2":
        return vertical
    if hint == "rect-4":
        return horizontal + vertical
    if hint == "diamond-4":  # a 2×2 grid despite its name
        return [((x1 + a * gx, y1 + b * gy), 1) for b in (1, 2) for a in (1, 2)]
    if hint == "mask-area":
        return _mask_area_points(seg, threshold, small_negative)
    return []  # "none": the box alone


def _mask_area_points(seg: SEG, threshold: float, small_negative: bool) -> list[tuple[Point, int]]:
    """Sample the cropped mask on a grid: > threshold → foreground, == 0 → background if Small."""
    mask = seg.cropped_mask
    left, top = seg.crop_region[0], seg.crop_region[1]
    points: list[tuple[Point, int]] = []
    for row in range(0, mask.shape[0], _grid_step(mask.shape[0])):
        for col in range(0, mask.shape[1], _grid_step(mask.shape[1])):
            value = mask[row, col]
            if value > threshold:
                points.append(((float(left + col), float(top + row)), 1))
            elif small_negative and value == 0:
                points.append(((float(left + col), float(top + row)), 0))
    return points


def _outer_negative_points(seg: SEG, shape: tuple[int, int]) -> list[tuple[Point, int]]:
    """Background grid over the image, away from the crop region (Outter; real W, H: Decision 2)."""
    height, width = shape
    x1, y1, x2, y2 = seg.crop_region
    points: list[tuple[Point, int]] = []
    for y in range(OUTER_MARGIN, height - OUTER_MARGIN, _grid_step(height)):
        for x in range(OUTER_MARGIN, width - OUTER_MARGIN, _grid_step(width)):
            near_crop = x1 - OUTER_MARGIN <= x <= x2 + OUTER_MARGIN and y1 - OUTER_MARGIN <= y <= y2 + OUTER_MARGIN
            if not near_crop:
                points.append(((float(x), float(y)), 0))
    return points


def _prompt(box: Box | None, labelled: Sequence[tuple[Point, int]]) -> SamPrompt:
    return SamPrompt(box=box, points=tuple(p for p, _ in labelled), labels=tuple(lab for _, lab in labelled))


def make_sam_prompts(
    segs: SEGS,
    *,
    detection_hint: str,
    bbox_expansion: int,
    mask_hint_threshold: float,
    mask_hint_use_negative: str,
) -> list[SamPrompt]:
    """One prompt per SEG (box + hint points), or one prompt for all SEGs with ``mask-points``."""
    if detection_hint not in get_args(SamDetectionHint):
        raise ValueError(f"unknown sam_detection_hint {detection_hint!r}; allowed: {get_args(SamDetectionHint)}")
    if mask_hint_use_negative not in get_args(SamNegativeMode):
        raise ValueError(f"unknown sam_mask_hint_use_negative {mask_hint_use_negative!r}")
    small_negative = mask_hint_use_negative == "Small"
    if detection_hint == "mask-points":
        if not segs.segs:
            return []
        labelled = [
            (_center(seg.bbox), 0 if small_negative and seg.bbox[2] - seg.bbox[0] < SMALL_BBOX_WIDTH else 1)
            for seg in segs.segs
        ]
        return [_prompt(None, labelled)]
    prompts = []
    for seg in segs.segs:
        box = _expanded_box(seg.bbox, bbox_expansion, segs.shape)
        labelled = _hint_points(detection_hint, seg, box, mask_hint_threshold, small_negative)
        if mask_hint_use_negative == "Outter":
            labelled += _outer_negative_points(seg, segs.shape)
        prompts.append(_prompt(box, labelled))
    return prompts


def select_sam_masks(masks: np.ndarray, scores: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Keep every mask scoring ≥ threshold; else the single best one, only if its score > 0 (§4.3).

    Ties for best go to the first mask, as the reference's strict ``>`` scan.
    """
    kept = [masks[k] for k in range(len(scores)) if scores[k] >= threshold]
    if kept:
        return kept
    best_score, best = 0.0, None
    for k in range(len(scores)):
        if scores[k] > best_score:
            best_score, best = float(scores[k]), masks[k]
    return [] if best is None else [best]


def combine_sam_masks(masks: Sequence[np.ndarray], shape: tuple[int, int], dilation: int) -> np.ndarray:
    """Union of all kept masks as a float32 0/1 [H, W] mask, then dilated/eroded (§4.4)."""
    if len(masks) == 0:
        return np.zeros(shape, np.float32)
    union = np.zeros(shape, bool)
    for mask in masks:
        if mask.shape != shape:
            raise ValueError(f"SAM mask shape {mask.shape} differs from the image's {shape}")
        union |= np.asarray(mask) > 0
    return dilate_mask(union.astype(np.float32), dilation)
