"""facedetailer-serve package: the pure FaceDetailer logic (no Ray, no torch, no models)."""

from facedetailer.params import FaceDetailerParams
from facedetailer.segs import SEG, SEGS, Detection

__all__ = ["SEG", "SEGS", "Detection", "FaceDetailerParams"]
