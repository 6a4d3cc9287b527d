"""ControlNet per face: the request's choice and each face's control image (no model code here).

The reference applies a ControlNet per SEG through Impact's ``ControlNetAdvancedWrapper``, which
calls ComfyUI's ``ControlNetApplyAdvanced`` with the face's *control image*:

- a full-size ``control_image`` given with the request (e.g. a pose or depth map of the whole
  picture) is resized to the image's size (Lanczos, 8-bit) and cut to the face's crop region;
- otherwise a preprocessor runs on the upscaled crop; with none, the upscaled crop itself is the
  control image (what a *tile* ControlNet wants).

A configured ControlNet names its ``preprocessor``: ``tile`` (the upscaled crop) or
``control_image`` (the request must send one). The control image of every refined face is the
node's ``cnet_images`` output. Strength, start and end percent are ComfyUI's; strength 0 is no
ControlNet at all (``ControlNetApplyAdvanced`` returns the conditioning unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from facedetailer.blend import resize_image
from facedetailer.segs import CropRegion

Preprocessor = Literal["tile", "control_image"]
PREPROCESSORS: tuple[str, ...] = ("tile", "control_image")


class ControlNetParams(BaseModel):
    """The request's ``controlnet``: ComfyUI ControlNetApplyAdvanced's inputs by name."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="a ControlNet the service configures (GET /v1/info: controlnets)")
    strength: float = Field(1.0, ge=0.0, le=10.0)
    start_percent: float = Field(0.0, ge=0.0, le=1.0)
    end_percent: float = Field(1.0, ge=0.0, le=1.0)
    control_image: str | None = Field(
        None, description="base64 PNG/JPEG of the whole picture, cut per face (needed by control_image ControlNets)"
    )

    @model_validator(mode="after")
    def _window_in_order(self) -> ControlNetParams:
        if self.start_percent > self.end_percent:
            raise ValueError(f"start_percent ({self.start_percent}) must not exceed end_percent ({self.end_percent})")
        return self

    @property
    def active(self) -> bool:
        """Strength 0 leaves the conditioning untouched, as ComfyUI's node does."""
        return self.strength != 0.0


@dataclass(frozen=True)
class ControlHint:
    """What the inpainter needs to apply a ControlNet to one crop."""

    name: str
    strength: float
    start_percent: float
    end_percent: float
    image: np.ndarray  # uint8 [h, w, 3]: the face's control image, as the node lists it in cnet_images


def control_image_for_face(
    preprocessor: str,
    upscaled_crop: np.ndarray,
    crop_region: CropRegion,
    image_size: tuple[int, int],
    control_image: np.ndarray | None,
) -> np.ndarray:
    """The face's control image, the way Impact's ControlNet wrappers take it.

    ``image_size`` is (width, height) of the image being detailed. A request's control image wins
    over the preprocessor, as in the reference; ``control_image`` ControlNets need one.
    """
    if control_image is not None:
        full = control_image
        if (full.shape[1], full.shape[0]) != tuple(image_size):
            full = resize_image(full, image_size)
        x1, y1, x2, y2 = crop_region
        return np.ascontiguousarray(full[y1:y2, x1:x2, :3])
    if preprocessor == "tile":
        return upscaled_crop
    raise ValueError(f"controlnet: preprocessor {preprocessor!r} needs a control_image with the request")
