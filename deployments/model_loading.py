"""The one place that turns a configured model reference into a model: real, or a ``sim://`` stand-in.

The real model modules (:mod:`deployments.detector`, :mod:`deployments.sam`,
:mod:`deployments.inpainter_loading`, :mod:`deployments.inpainter`) know nothing of the simulated
accelerator, and :mod:`deployments.simulated` builds on them: the import arrows point one way, and
the choice between the two is made here, for the Serve deployments, the benchmarks and the tests
alike. Constructing a real class directly with a ``sim://`` reference fails with
:class:`~deployments.weights.WeightsNotFoundError` naming these loaders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deployments import inpainter_loading, simulated
from deployments.detector import FaceDetector
from deployments.inpainter import Inpainter
from deployments.inpainter_loading import SDComponents
from deployments.sam import SamSegmenter
from deployments.weights import is_simulated


def load_detector(model: str, **options: Any) -> FaceDetector:
    """A :class:`FaceDetector` (bbox or segm), or :class:`~deployments.simulated.SimulatedDetector` for ``sim://detector``."""
    if is_simulated(model):
        return simulated.SimulatedDetector(model, **options)
    return FaceDetector(model, **options)


def load_segmenter(checkpoint: str, **options: Any) -> SamSegmenter:
    """A :class:`SamSegmenter`, or :class:`~deployments.simulated.SimulatedSegmenter` for ``sim://sam``."""
    if is_simulated(checkpoint):
        return simulated.SimulatedSegmenter(checkpoint, **options)
    return SamSegmenter(checkpoint, **options)


def load_sd_components(
    model: str,
    *,
    single_file_config: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> SDComponents:
    """A checkpoint's components, or the simulated ones for ``sim://sd15[-inpainting]``."""
    if is_simulated(model):
        return simulated.load_simulated_components(model, dtype=dtype)
    return inpainter_loading.load_sd_components(
        model, single_file_config=single_file_config, dtype=dtype, cache_dir=cache_dir
    )


def load_inpainter(model: str | None = None, **options: Any) -> Inpainter:
    """An :class:`Inpainter` on a real checkpoint (any family, any layout) or on simulated components (``sim://sd15…``)."""
    return Inpainter(model, load_components=load_sd_components, **options)
