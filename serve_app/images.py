"""Image decoding and encoding at the service's edge, with the limits checked before decoding."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from serve_app.config import Limits

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageInputError(ValueError):
    """A client-side image problem, carrying the HTTP status it maps to."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


def decode_image(data: bytes, limits: Limits, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/WebP bytes to RGB uint8 [H, W, 3], refusing oversized input first."""
    if not data:
        raise ImageInputError(f"{name}: empty upload")
    if len(data) > limits.max_upload_bytes:
        raise ImageInputError(
            f"{name}: {len(data)} bytes exceeds the limit of {limits.max_upload_bytes} bytes", 413
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in ACCEPTED_FORMATS:
                    raise ImageInputError(
                        f"{name}: format {image.format} is not accepted (use {', '.join(ACCEPTED_FORMATS)})", 415
                    )
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise ImageInputError(
                        f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
                        f"{limits.max_image_pixels} pixels",
                        413,
                    )
                image.load()
                return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    except ImageInputError:
        raise
    except UnidentifiedImageError as error:
        raise ImageInputError(f"{name}: not an image (expected {', '.join(ACCEPTED_FORMATS)})", 415) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageInputError(f"{name}: image too large to decode safely", 413) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(f"{name}: corrupt or truncated image: {error}") from error


def decode_base64_image(text: str, limits: Limits, name: str = "image") -> np.ndarray:
    if not isinstance(text, str):
        raise ImageInputError(f"{name}: expected a base64 string", 422)
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    if len(payload) * 3 // 4 > limits.max_upload_bytes:
        raise ImageInputError(f"{name}: encoded image exceeds the limit of {limits.max_upload_bytes} bytes", 413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageInputError(f"{name}: not valid base64") from error
    return decode_image(data, limits, name)


def as_uint8_image(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Accept uint8 0–255 or float 0–1 RGB arrays (the node's convention) from Python callers."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageInputError(f"{name}: expected an array [H, W, 3], got shape {array.shape}", 422)
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        return np.ascontiguousarray((np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8))
    raise ImageInputError(f"{name}: unsupported dtype {array.dtype} (use uint8 or float in [0, 1])", 422)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB/RGBA uint8 image or a float mask in [0, 1]."""
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_png_base64(array: np.ndarray) -> str:
    return base64.b64encode(encode_png(array)).decode("ascii")
