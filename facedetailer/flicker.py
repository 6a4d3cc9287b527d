"""Flicker inside the face regions of a video: how much detailing added to frame-to-frame change.

``region_change`` is the mean absolute difference between consecutive frames (0–255 RGB values)
over the pixels inside a face region in either frame. ``flicker_ratio`` divides the output's by
the input's, measured on the same regions: 1.0 means the detailed faces change from frame to
frame no more than the source faces did; 3.0 means three times as much (faces "jump around").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from facedetailer.segs import Box


def box_masks(shape: tuple[int, int], boxes_per_frame: Sequence[Sequence[Box]]) -> list[np.ndarray]:
    """One boolean [H, W] mask per frame: the union of that frame's boxes (clipped to the image)."""
    height, width = shape
    masks = []
    for boxes in boxes_per_frame:
        mask = np.zeros((height, width), bool)
        for x1, y1, x2, y2 in boxes:
            left, top = max(int(x1), 0), max(int(y1), 0)
            right, bottom = min(int(np.ceil(x2)), width), min(int(np.ceil(y2)), height)
            if right > left and bottom > top:
                mask[top:bottom, left:right] = True
        masks.append(mask)
    return masks


def region_change(frames: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Mean |frame_t − frame_{t−1}| over the pixels (and channels) of mask_t ∪ mask_{t−1}.

    Pairs with no face pixel do not count; a video with none gives 0.0.
    """
    if len(frames) != len(masks):
        raise ValueError(f"{len(frames)} frames but {len(masks)} masks")
    total, count = 0.0, 0
    for index in range(1, len(frames)):
        region = masks[index] | masks[index - 1]
        pixels = int(region.sum())
        if not pixels:
            continue
        before = np.asarray(frames[index - 1], np.float64)[region]
        after = np.asarray(frames[index], np.float64)[region]
        total += float(np.abs(after - before).sum())
        count += pixels * (before.shape[-1] if before.ndim > 1 else 1)
    return total / count if count else 0.0


def flicker_ratio(
    inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], masks: Sequence[np.ndarray]
) -> float:
    """``region_change(outputs) / region_change(inputs)`` on the same masks (1.0 = no added flicker).

    A still input (no change in the regions) gives ``inf`` if the output changes, else 1.0.
    """
    source = region_change(inputs, masks)
    result = region_change(outputs, masks)
    if source == 0.0:
        return 1.0 if result == 0.0 else float("inf")
    return result / source
