"""Detections → SEGS: crop regions, mask dilation, size filter and mask algebra.

Spec §2; reference §1, §3.2–3.4, §4.5 and §7.4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 floats, x2/y2 exclusive
CropRegion = tuple[int, int, int, int]  # x1, y1, x2, y2 ints inside the image


@dataclass(frozen=True)
class Detection:
    """One detector output; the detector has already applied its confidence threshold.

    ``mask`` is a float32 [H, W] full-image mask in [0, 1] for segm models; ``None`` means a bbox
    model, whose mask is the filled box over the integer span [int(x1)..int(x2)] x [int(y1)..int(y2)],
    both ends inclusive (reference §3.2 step 4).
    """

    label: str
    bbox: Box
    confidence: float
    mask: np.ndarray | None = None


@dataclass
class SEG:
    """One region to detail (reference §1.1); ``cropped_mask`` has the crop region's size."""

    crop_region: CropRegion
    bbox: Box
    cropped_mask: np.ndarray
    confidence: float
    label: str
    cropped_image: np.ndarray | None = None


@dataclass
class SEGS:
    """``((H, W), [SEG, ...])`` of the reference (§1.2)."""

    shape: tuple[int, int]
    segs: list[SEG]


def _fit_axis(limit: int, start: int, size: float) -> tuple[int, int]:
    """Shift a window of ``size`` back inside [0, limit]; clamp only if it is larger (reference §3.4)."""
    if start < 0:
        low, high = 0.0, min(float(limit), size)
    elif start + size > limit:
        low, high = max(0.0, limit - size), float(limit)
    else:
        low, high = float(start), min(float(limit), start + size)
    return int(low), int(high)


def make_crop_region(width: int, height: int, bbox: Box, crop_factor: float) -> CropRegion:
    """The context window: bbox scaled by ``crop_factor`` about its centre, shifted inside the image."""
    x1, y1, x2, y2 = bbox
    box_w, box_h = x2 - x1, y2 - y1
    crop_w, crop_h = box_w * crop_factor, box_h * crop_factor
    start_x = int(x1 + box_w / 2 - crop_w / 2)  # int() truncates toward zero, as the reference
    start_y = int(y1 + box_h / 2 - crop_h / 2)
    left, right = _fit_axis(width, start_x, crop_w)
    top, bottom = _fit_axis(height, start_y, crop_h)
    return left, top, right, bottom


def dilate_mask(mask: np.ndarray, dilation: int) -> np.ndarray:
    """Grow (d > 0) or shrink (d < 0, Decision 1) a mask with a |d|×|d| all-ones kernel, one pass.

    OpenCV anchors the kernel at its centre, so d=10 grows 4 px up/left and 5 px down/right.
    """
    if dilation == 0:
        return mask.copy()
    kernel = np.ones((abs(dilation), abs(dilation)), np.uint8)
    source = np.ascontiguousarray(mask, dtype=np.float32)
    if dilation > 0:
        return cv2.dilate(source, kernel, iterations=1)
    return cv2.erode(source, kernel, iterations=1)


def _detection_mask_window(detection: Detection, window: CropRegion, shape: tuple[int, int]) -> np.ndarray:
    """The detection's full-image mask, restricted to ``window`` (so big images stay cheap)."""
    wx1, wy1, wx2, wy2 = window
    if detection.mask is not None:
        if detection.mask.shape != shape:
            raise ValueError(f"segm mask shape {detection.mask.shape} differs from the image's {shape}")
        return np.asarray(detection.mask[wy1:wy2, wx1:wx2], dtype=np.float32).copy()
    x1, y1, x2, y2 = detection.bbox
    out = np.zeros((wy2 - wy1, wx2 - wx1), np.float32)
    col0, col1 = max(int(x1), 0), int(x2) + 1  # inclusive integer span
    row0, row1 = max(int(y1), 0), int(y2) + 1
    out[max(row0 - wy1, 0) : max(row1 - wy1, 0), max(col0 - wx1, 0) : max(col1 - wx1, 0)] = 1.0
    return out


def _cropped_detection_mask(
    detection: Detection, crop: CropRegion, shape: tuple[int, int], dilation: int
) -> np.ndarray:
    """Dilate the mask and cut it to ``crop``; equals dilating the full-image mask then cutting.

    The work window is the crop grown by |dilation| (clipped to the image): every crop pixel's
    kernel neighbourhood lies inside it, and outside the image behaves as in the full-image case.
    """
    height, width = shape
    x1, y1, x2, y2 = crop
    margin = abs(dilation)
    window = (max(x1 - margin, 0), max(y1 - margin, 0), min(x2 + margin, width), min(y2 + margin, height))
    dilated = dilate_mask(_detection_mask_window(detection, window, shape), dilation)
    ox, oy = x1 - window[0], y1 - window[1]
    return np.ascontiguousarray(dilated[oy : oy + (y2 - y1), ox : ox + (x2 - x1)])


def detections_to_segs(
    image: np.ndarray,
    detections: Sequence[Detection],
    *,
    dilation: int,
    crop_factor: float,
    drop_size: int,
    post_crop_region: Callable[[int, int, Box, CropRegion], CropRegion] | None = None,
) -> SEGS:
    """Build SEGS from detections, keeping their order (reference §3.2 steps 1, 4–9).

    A detection is kept only if its box is strictly wider **and** taller than ``max(drop_size, 1)``.
    Dilation changes the mask only, never the bbox or the crop region. ``post_crop_region`` is
    the hook point of the same name: ``(W, H, bbox, crop_region) -> crop_region``, called for
    each kept box before its mask and image are cut.
    """
    height, width = image.shape[:2]
    min_side = max(int(drop_size), 1)
    segs: list[SEG] = []
    for detection in detections:
        x1, y1, x2, y2 = detection.bbox
        if not (x2 - x1 > min_side and y2 - y1 > min_side):
            continue
        crop = make_crop_region(width, height, detection.bbox, crop_factor)
        if post_crop_region is not None:
            crop = post_crop_region(width, height, detection.bbox, crop)
        cx1, cy1, cx2, cy2 = crop
        segs.append(
            SEG(
                crop_region=crop,
                bbox=(float(x1), float(y1), float(x2), float(y2)),
                cropped_mask=_cropped_detection_mask(detection, crop, (height, width), dilation),
                confidence=float(detection.confidence),
                label=detection.label,
                cropped_image=image[cy1:cy2, cx1:cx2].copy(),
            )
        )
    return SEGS(shape=(height, width), segs=segs)


def mask_to_u8(mask: np.ndarray) -> np.ndarray:
    """``u8(255·m)`` with truncation, as the reference's ``(m * 255).astype(np.uint8)``."""
    scaled = np.asarray(mask, dtype=np.float32) * np.float32(255.0)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def segs_to_combined_mask(segs: SEGS) -> np.ndarray:
    """OR of every SEG's mask placed at its crop region, bytewise on u8 values (reference §7.4)."""
    combined = np.zeros(segs.shape, np.uint8)
    for seg in segs.segs:
        x1, y1, x2, y2 = seg.crop_region
        combined[y1:y2, x1:x2] |= mask_to_u8(seg.cropped_mask)
    return combined.astype(np.float32) / np.float32(255.0)


def segs_bitwise_and_mask(segs: SEGS, mask: np.ndarray) -> SEGS:
    """Intersect every SEG's mask with a full-image mask, bytewise on u8 values (reference §4.5).

    Empty results stay in the SEGS; the detailer skips them later.
    """
    if mask.shape != segs.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the SEGS shape {segs.shape}")
    new_segs = []
    for seg in segs.segs:
        x1, y1, x2, y2 = seg.crop_region
        both = mask_to_u8(seg.cropped_mask) & mask_to_u8(mask[y1:y2, x1:x2])
        new_segs.append(replace(seg, cropped_mask=both.astype(np.float32) / np.float32(255.0)))
    return SEGS(shape=segs.shape, segs=new_segs)
