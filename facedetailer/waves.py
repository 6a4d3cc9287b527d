"""Refinement waves: which faces may be refined together without changing the result.

The reference refines faces one after another on the live image, so a face whose crop region
overlaps an earlier face's crop sees that face's result (reference §5.3). Faces whose crops do
not overlap any earlier face still waiting are independent and can share one inpainter batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from facedetailer.segs import CropRegion


def regions_overlap(a: CropRegion, b: CropRegion) -> bool:
    """Whether two half-open boxes share at least one pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def refinement_waves(crop_regions: Sequence[CropRegion]) -> list[list[int]]:
    """Group positions into waves; a face goes one wave after the latest earlier face it overlaps.

    Within a wave no two crops overlap, and every face that must see another's result comes in a
    later wave, so refining wave by wave (pasting each wave before cropping the next) equals the
    one-by-one order.
    """
    wave_of: list[int] = []
    for position, region in enumerate(crop_regions):
        earlier = [wave_of[i] for i in range(position) if regions_overlap(crop_regions[i], region)]
        wave_of.append(max(earlier) + 1 if earlier else 0)
    waves: list[list[int]] = [[] for _ in range(max(wave_of, default=-1) + 1)]
    for position, wave in enumerate(wave_of):
        waves[wave].append(position)
    return waves
