"""Image decoding and encoding at the service's edge, with the limits checked before decoding.

Every image is loaded as ComfyUI's ``LoadImage`` loads it (spec Decision 13): the EXIF
orientation applied (the image is upright, and so is the result), then converted to RGB —
palette (with or without transparency), grey, grey + alpha, RGBA and CMYK as Pillow's RGB
conversion does it, alpha dropped from the image. Except that 16-bit and float images are
*scaled* to 8 bits, never clipped: a 16-bit value v becomes v // 257 (65535 → 255, the inverse
of 8-bit v → 257·v), truncating as ComfyUI quantises (Decision 11); a float value x in [0, 1]
becomes int(255·x). (Pillow opens 16-bit PNGs as ``I;16``, which its RGB conversion clips to
255 above 255; LoadImage scales mode ``I`` by 1/255, which clips the top of a 16-bit range.)
Only the first frame of an animated image is read (LoadImage stacks the frames as a batch).
The same conversion applies to arrays from Python callers (:func:`as_uint8_image`).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import sys
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.config import Limits

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "MPO")  # MPO: a camera's multi-picture JPEG (its first picture)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 32-bit ints holding 16-bit data (PNG)
EXIF_ORIENTATION = 0x0112


class ImageInputError(ValueError):
    """A client-side image problem, carrying the HTTP status it maps to."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


def decode_image(data: bytes, limits: Limits, name: str = "image") -> np.ndarray:
    """Decode PNG/JPEG/WebP bytes to RGB uint8 [H, W, 3] as LoadImage loads them, refusing oversized input first."""
    if not data:
        raise ImageInputError(f"{name}: empty upload")
    if len(data) > limits.max_upload_bytes:
        raise ImageInputError(
            f"{name}: {len(data)} bytes exceeds the limit of {limits.max_upload_bytes} bytes", 413
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with pillow_open()(io.BytesIO(data)) as image:
                if image.format not in ACCEPTED_FORMATS:
                    raise ImageInputError(
                        f"{name}: format {image.format} is not accepted (use PNG, JPEG or WebP)", 415
                    )
                width, height = image.size
                if width * height > limits.max_image_pixels:
                    raise ImageInputError(
                        f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of "
                        f"{limits.max_image_pixels} pixels",
                        413,
                    )
                image.load()
                return loaded_rgb(image)
    except ImageInputError:
        raise
    except UnidentifiedImageError as error:
        raise ImageInputError(f"{name}: not an image (expected PNG, JPEG or WebP)", 415) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageInputError(f"{name}: image too large to decode safely", 413) from error
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error) as error:
        # Pillow's decoders say what is broken; their messages name no server path
        raise ImageInputError(f"{name}: corrupt or truncated image: {str(error)[:200]}") from error
    except Exception as error:  # a decoder failing in another way on hostile bytes is still the file's fault
        raise ImageInputError(f"{name}: the image could not be decoded ({type(error).__name__})") from error


def pillow_open() -> Any:
    """Pillow's own ``Image.open``.

    Importing ultralytics replaces ``PIL.Image.open`` process-wide with a wrapper that, on the first
    file Pillow cannot identify, installs and registers a HEIF plugin (``check_requirements("pi-heif")``)
    — a package install in the middle of a request, or an import error. Uploads are identified by
    Pillow alone (PNG, JPEG, WebP), so the original is used wherever ultralytics is loaded.
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open) if patches is not None else Image.open


def loaded_rgb(image: Image.Image) -> np.ndarray:
    """An opened image as RGB uint8 [H, W, 3], the way LoadImage loads it (module docstring)."""
    image = upright(image)
    if image.mode in SIXTEEN_BIT_MODES:
        grey = sixteen_bit_to_uint8(np.asarray(image))
    elif image.mode == "F":
        grey = float_to_uint8(np.asarray(image))
    else:
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (``ImageOps.exif_transpose``), as LoadImage does."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in (None, 1):
        return image  # nothing to turn: no copy
    return ImageOps.exif_transpose(image)


def sixteen_bit_to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit data (0 … 65535; wider integers are clipped to that first) → v // 257."""
    return (np.clip(values.astype(np.int64), 0, 65535) // 257).astype(np.uint8)


def float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] (ComfyUI's IMAGE) → int(255·x), clipped to [0, 1] first; NaN is 0."""
    return (np.clip(np.nan_to_num(values.astype(np.float32), nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


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
    """A Python caller's image as RGB uint8 [H, W, 3], converted as :func:`loaded_rgb` converts a file.

    [H, W] or [H, W, 1] is grey, [H, W, 4] drops alpha; uint8 is taken as is, uint16 scaled
    (v // 257), floats are the node's convention (0 … 1: int(255·x)).
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ImageInputError(f"{name}: expected an array [H, W, 3], got shape {array.shape}", 422)
    array = array[..., :3]
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = sixteen_bit_to_uint8(array)
    elif np.issubdtype(array.dtype, np.floating):
        array = float_to_uint8(array)
    else:
        raise ImageInputError(f"{name}: unsupported dtype {array.dtype} (use uint8, uint16 or float in [0, 1])", 422)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB/RGBA uint8 image or a float mask in [0, 1]."""
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_png_base64(array: np.ndarray) -> str:
    return base64.b64encode(encode_png(array)).decode("ascii")
