"""SEGS filters: keep faces by rank, by range or by label (Impact's SEGS filter nodes).

The detailer hooks ``segs_ordered_filter``, ``segs_range_filter`` and ``segs_label_filter`` run
these at the end of detection (reference §9, hook point ``post_detection``). As in the
reference, every geometric value is measured on the SEG's **crop region** (not its bbox), and
filters keep the SEGS' order except the ordered filter, which returns its stable sort.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from facedetailer.segs import SEG, SEGS

OrderedTarget = Literal["area", "width", "height", "x1", "y1", "x2", "y2"]
RangeTarget = Literal["area", "width", "height", "x1", "y1", "x2", "y2", "length_percent"]

# Label groups the reference's label filter accepts besides exact labels.
LABEL_GROUPS: dict[str, tuple[str, ...]] = {
    "eyes": ("left_eye", "right_eye"),
    "eyebrows": ("left_eyebrow", "right_eyebrow"),
    "pupils": ("left_pupil", "right_pupil"),
}


def crop_value(seg: SEG, target: str) -> float:
    """The value a filter compares: the crop region's area, side, corner or aspect (in percent)."""
    x1, y1, x2, y2 = seg.crop_region
    width, height = x2 - x1, y2 - y1
    if target == "area":
        return height * width
    if target == "width":
        return width
    if target == "height":
        return height
    if target == "length_percent":  # the longer side over the shorter one, as a percentage
        if width <= 0 or height <= 0:
            return float("inf")
        return max(height / width, width / height) * 100
    corners = {"x1": x1, "y1": y1, "x2": x2, "y2": y2}
    if target in corners:
        return corners[target]
    raise ValueError(f"unknown SEGS filter target {target!r}")


def segs_ordered_filter(segs: SEGS, target: OrderedTarget, descending: bool, take_start: int, take_count: int) -> SEGS:
    """Sort by ``target`` (stable; ``descending`` as the node's ``order``) and keep a slice of it."""
    ranked = sorted(segs.segs, key=lambda seg: crop_value(seg, target), reverse=descending)
    return SEGS(shape=segs.shape, segs=ranked[take_start : take_start + take_count])


def segs_range_filter(segs: SEGS, target: RangeTarget, inside: bool, min_value: int, max_value: int) -> SEGS:
    """Keep faces whose value lies in [min, max] (``inside``) or outside it, bounds inclusive."""
    kept = []
    for seg in segs.segs:
        value = crop_value(seg, target)
        within = min_value <= value <= max_value
        if within == inside:
            kept.append(seg)
    return SEGS(shape=segs.shape, segs=kept)


def parse_labels(labels: str | Iterable[str]) -> set[str]:
    """The node's comma-separated list (a list of names is taken as already split), each stripped."""
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    return {item.strip() for item in items}


def segs_label_filter(segs: SEGS, labels: str | Iterable[str]) -> SEGS:
    """Keep faces whose label is listed; ``all`` keeps every face; ``eyes`` etc. name label groups.

    Labels compare exactly (case-sensitive), as in the reference; an empty list keeps nothing.
    """
    wanted = parse_labels(labels)
    if "all" in wanted:
        return SEGS(shape=segs.shape, segs=list(segs.segs))
    allowed = set(wanted)
    for group, members in LABEL_GROUPS.items():
        if group in wanted:
            allowed.update(members)
    return SEGS(shape=segs.shape, segs=[seg for seg in segs.segs if seg.label in allowed])
