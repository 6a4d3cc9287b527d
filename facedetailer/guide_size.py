"""Whether and how much to upscale a crop before sampling (spec §4, reference §6.2, Q11)."""

from __future__ import annotations

from dataclasses import dataclass

from facedetailer.segs import Box


@dataclass(frozen=True)
class UpscalePlan:
    """The decision for one SEG.

    ``reason`` says why: a skip reason ("enough big", "upscale <= 1", "zero size"), or
    "force inpaint" when force_inpaint turned a would-be skip into sampling at 1×; ``None`` for a
    plain upscale. ``new_size`` is (width, height), never rounded to a multiple of 8 here.
    """

    skip: bool
    reason: str | None
    upscale: float
    new_size: tuple[int, int]


def plan_upscale(
    crop_size: tuple[int, int],
    bbox: Box,
    *,
    guide_size: float,
    guide_size_for_bbox: bool,
    max_size: float,
    force_inpaint: bool,
) -> UpscalePlan:
    """The reference's ``enhance_detail`` scale rules, step for step. ``crop_size`` is (w, h)."""
    width, height = crop_size
    box_w, box_h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    native = UpscalePlan(skip=False, reason="force inpaint", upscale=1.0, new_size=(width, height))

    # The "enough big" test always measures the bbox, whatever guide_size_for says (Q11).
    if not force_inpaint and box_h >= guide_size and box_w >= guide_size:
        return UpscalePlan(skip=True, reason="enough big", upscale=1.0, new_size=(width, height))

    shorter = min(box_w, box_h) if guide_size_for_bbox else min(width, height)
    if shorter <= 0:
        if force_inpaint:
            return native
        return UpscalePlan(skip=True, reason="zero size", upscale=0.0, new_size=(0, 0))
    upscale = guide_size / shorter
    new_w, new_h = int(width * upscale), int(height * upscale)
    if new_w > max_size or new_h > max_size:
        upscale *= max_size / max(new_w, new_h)  # from the already-truncated sizes, as the reference
        new_w, new_h = int(width * upscale), int(height * upscale)

    if upscale <= 1.0 or new_w == 0 or new_h == 0:
        if force_inpaint:
            return native
        reason = "upscale <= 1" if upscale <= 1.0 else "zero size"
        return UpscalePlan(skip=True, reason=reason, upscale=upscale, new_size=(new_w, new_h))
    return UpscalePlan(skip=False, reason=None, upscale=upscale, new_size=(new_w, new_h))
