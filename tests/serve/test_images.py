"""Images as ComfyUI's LoadImage loads them (spec Decision 13), from real files in every mode.

LoadImage (ComfyUI nodes.py): ``ImageOps.exif_transpose``, then ``convert("RGB")`` — except that a
16-bit or float image is scaled to 8 bits here (v // 257, int(255·x)) where Pillow's RGB conversion
clips it. Handle callers' arrays follow the same rules (:func:`serve_app.images.as_uint8_image`).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from deployments.testing import assets
from serve_app.config import Limits
from serve_app.images import ImageInputError, as_uint8_image, decode_image, loaded_rgb

LIMITS = Limits()
ORIENTATION = 0x0112


def encoded(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def comfyui_rgb(data: bytes) -> np.ndarray:
    """What LoadImage's own steps give for 8-bit modes: exif_transpose, then convert("RGB")."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped():
    ramp = np.linspace(0, 65535, 256 * 64).reshape(64, 256).astype(np.uint16)
    data = encoded(Image.fromarray(ramp), "PNG")
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode in ("I;16", "I")  # how Pillow opens it
        clipped = np.asarray(opened.convert("RGB"))  # what the service did before
    decoded = decode_image(data, LIMITS)
    assert decoded.shape == (64, 256, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded[..., 0], (ramp // 257).astype(np.uint8))
    assert np.array_equal(decoded[..., 0], decoded[..., 2])
    assert np.mean(clipped == 255) > 0.98  # the old conversion: nearly every pixel white
    assert np.mean(decoded == 255) < 0.01  # scaled: only the top of the ramp is 255
    assert decoded.min() == 0 and decoded.max() == 255


def test_16_bit_round_trip_of_8_bit_values_is_exact():
    values = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # 8-bit v written as 16-bit 257·v
    decoded = decode_image(encoded(Image.fromarray(values), "PNG"), LIMITS)
    assert np.array_equal(decoded[..., 1], np.arange(256, dtype=np.uint8).reshape(16, 16))


def test_mode_i_and_float_images_are_scaled():
    wide = Image.fromarray(np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32))
    assert wide.mode == "I"
    assert loaded_rgb(wide)[0, :, 0].tolist() == [0, 1, 255, 255, 0]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert loaded_rgb(floats)[0, :, 0].tolist() == [0, 127, 255, 255, 0]


def exif_rotated_astronaut() -> tuple[bytes, np.ndarray]:
    """The astronaut stored on its side (a camera held sideways) with EXIF orientation 6, and upright."""
    upright = assets.astronaut()
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # 90° counter-clockwise, as the sensor saw it
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90° clockwise to display"
    return encoded(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()), upright


def test_exif_orientation_is_applied():
    data, upright = exif_rotated_astronaut()
    decoded = decode_image(data, LIMITS)
    assert decoded.shape == upright.shape  # 512×512 here: compare pixels, not only the shape
    assert np.abs(decoded.astype(int) - upright.astype(int)).mean() < 4  # JPEG noise only
    assert np.array_equal(decoded, comfyui_rgb(data))
    sideways = np.abs(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int) - upright.astype(int))
    assert sideways.mean() > 30  # without the orientation the pixels are far from upright


@pytest.mark.models
def test_the_detector_finds_the_face_after_loading_an_exif_rotated_photo():
    from deployments.detector import FaceDetector

    detector = FaceDetector(str(assets.faceghost_face_onnx()))
    data, _ = exif_rotated_astronaut()
    with Image.open(io.BytesIO(data)) as image:
        raw = np.asarray(image.convert("RGB"))  # the file's pixels, sideways
    upright = decode_image(data, LIMITS)
    found = detector.detect(upright, 0.3)
    print(f"\nfaces at 0.3: sideways pixels {len(detector.detect(raw, 0.3))}, loaded upright {len(found)}")
    assert len(found) == 1
    x1, y1, x2, y2 = found[0].bbox
    assert 150 < (x1 + x2) / 2 < 300 and 50 < (y1 + y2) / 2 < 200  # the astronaut's face, upright


@pytest.mark.parametrize(
    "mode",
    ["P-transparency", "LA", "CMYK", "RGBA", "L", "1", "P"],
)
def test_other_modes_convert_as_loadimage_does_alpha_dropped(mode):
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    if mode == "P-transparency":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        data = encoded(image, "PNG", transparency=5)
        with Image.open(io.BytesIO(data)) as opened:
            assert opened.mode == "P" and "transparency" in opened.info
    elif mode == "CMYK":
        data = encoded(rgb.convert("CMYK"), "JPEG", quality=95)
    else:
        data = encoded(rgb.convert(mode), "PNG")
    decoded = decode_image(data, LIMITS)
    assert decoded.shape == (40, 56, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded, comfyui_rgb(data))


def test_only_the_first_frame_of_a_multi_frame_file():
    frames = [Image.new("RGB", (32, 24), colour) for colour in ((200, 0, 0), (0, 200, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert decode_image(buffer.getvalue(), LIMITS)[0, 0].tolist() == [200, 0, 0]
    mpo = io.BytesIO()
    frames[0].save(mpo, format="MPO", save_all=True, append_images=frames[1:], quality=95)
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"  # a camera's multi-picture JPEG
    assert decode_image(mpo.getvalue(), LIMITS)[0, 0, 0] > 190


def test_refused_files_say_why_without_server_detail():
    with pytest.raises(ImageInputError) as caught:
        decode_image(encoded(Image.new("RGB", (8, 8)), "GIF"), LIMITS)
    assert caught.value.status_code == 415 and "PNG, JPEG or WebP" in str(caught.value)
    with pytest.raises(ImageInputError) as caught:
        decode_image(encoded(Image.new("RGB", (64, 64)), "PNG")[:60], LIMITS)
    assert caught.value.status_code == 400 and "corrupt or truncated" in str(caught.value)


def test_handle_arrays_follow_the_same_rules():
    ramp = np.linspace(0, 65535, 48 * 32).reshape(32, 48).astype(np.uint16)
    from_file = decode_image(encoded(Image.fromarray(ramp), "PNG"), LIMITS)
    assert np.array_equal(as_uint8_image(ramp), from_file)  # [H, W] grey
    assert np.array_equal(as_uint8_image(np.repeat(ramp[..., None], 3, axis=-1)), from_file)  # 16-bit RGB
    floats = np.array([[[0.0, 0.5, 1.0], [2.0, -1.0, np.nan]]], dtype=np.float32)
    assert as_uint8_image(floats).tolist() == [[[0, 127, 255], [255, 0, 0]]]
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255
    assert as_uint8_image(rgba).shape == (4, 4, 3)
    with pytest.raises(ImageInputError, match="unsupported dtype int64"):
        as_uint8_image(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(ImageInputError, match="expected an array"):
        as_uint8_image(np.zeros((4, 4, 2), np.uint8))


def test_a_non_image_is_a_415_even_where_ultralytics_patched_pillow():
    """Importing ultralytics replaces PIL.Image.open with a wrapper that installs a HEIF plugin on the
    first unidentified file (found by the fuzzer as a 500 once ultralytics was loaded): not used here."""
    import ultralytics.utils.patches

    assert Image.open is ultralytics.utils.patches.image_open  # the process-wide patch is in place
    with pytest.raises(ImageInputError) as caught:
        decode_image(b"hello, this is not an image", LIMITS)
    assert caught.value.status_code == 415
    assert not ultralytics.utils.patches._pil_plugins_registered
