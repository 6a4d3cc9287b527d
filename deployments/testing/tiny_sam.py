"""The ``tiny_test`` SAM with random weights, saved as a state-dict ``.pth`` like SAM's own checkpoints.

Its architecture comes from :data:`deployments.sam.TINY_TEST_CONFIG`, the config the loader uses,
so :class:`deployments.sam.SamSegmenter` loads it through the same strict path as real weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_TYPE = "tiny_test"
FILE_NAME = "sam_tiny_test.pth"
SEED = 0


def build_tiny_sam(directory: Path) -> dict[str, str]:
    """Write the checkpoint into ``directory``; return its absolute path and model type."""
    from deployments.sam import build_sam_model

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = build_sam_model(MODEL_TYPE)
    path = directory / FILE_NAME
    torch.save(model.state_dict(), path)
    return {"checkpoint": str(path), "model_type": MODEL_TYPE}
