"""facedetailer-serve package."""
