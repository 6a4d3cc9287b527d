"""The node's list outputs (``cropped_refined``, ``cropped_enhanced_alpha``, ``cnet_images``).

Reference §5.3 step 12 and §7.3: each image's crops are sorted by shape, largest first, and an
image without any contributes one black 64×64×3 placeholder; the batch's lists are the images'
lists joined in image order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EMPTY_PLACEHOLDER_SIZE = 64


def black_placeholder() -> np.ndarray:
    """The node's stand-in for an empty list: ``empty_pil_tensor()``, black 64×64, three channels."""
    return np.zeros((EMPTY_PLACEHOLDER_SIZE, EMPTY_PLACEHOLDER_SIZE, 3), dtype=np.uint8)


def sorted_by_shape(crops_in_processing_order: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Sort by (height, width, channels) descending; crops of equal shape keep processing order.

    The reference sorts its lists by tensor shape with Python's stable sort (Q9), so the input
    must be in the order the faces were processed (position in the processing order), not in
    the order their results came back.
    """
    return sorted(crops_in_processing_order, key=lambda crop: tuple(crop.shape), reverse=True)


def node_list(per_image: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """The batch's list: each image's items, or one black placeholder for an image with none."""
    joined: list[np.ndarray] = []
    for items in per_image:
        joined.extend(items if len(items) else [black_placeholder()])
    return joined
