"""Feather, paste and resizes (spec §6; reference §6.3, §6.8, §7.1–7.3, Q13)."""

import math

import numpy as np
import pytest

from facedetailer.blend import (
    feather_kernel_size,
    feather_mask,
    paste,
    resize_image,
    resize_mask,
    rgba_with_alpha,
    save_image_bytes,
    to_comfy_float,
)


@pytest.mark.parametrize(
    ("shape", "feather", "kernel"),
    [
        ((100, 100), 0, 0),  # feather 0: no blur
        ((100, 100), 5, 11),  # K = 2f + 1
        ((12, 50), 5, 11),  # shorter side 12 > 11
        ((50, 11), 5, 5),  # shorter side 11 <= 11 → 11 // 2 = 5
        ((10, 50), 5, 5),  # 10 // 2 = 5
        ((8, 8), 5, 5),  # 8 // 2 = 4 → made odd 5
        ((4, 40), 100, 3),  # 2 → 3
        ((3, 40), 100, 0),  # 1 < 3 → no blur
        ((2, 40), 100, 0),
        ((200, 200), 100, 101),  # 200 <= 201 → 100 → 101
        ((300, 300), 100, 201),
    ],
)
def test_feather_kernel_size(shape, feather, kernel):
    assert feather_kernel_size(shape, feather) == kernel


def test_feather_zero_leaves_the_mask_unchanged():
    mask = np.random.default_rng(1).random((9, 7)).astype(np.float32)
    assert np.array_equal(feather_mask(mask, 0), mask)


def test_feather_one_is_a_three_tap_gaussian_of_sigma_ten():
    mask = np.zeros((20, 20), np.float32)
    mask[:, :10] = 1
    out = feather_mask(mask, 1)  # K = 3, weights e, 1, e over 1 + 2e with e = exp(-1/200)
    e = math.exp(-1 / 200)
    assert out[5, 10] == pytest.approx(e / (1 + 2 * e), abs=1e-6)
    assert out[5, 9] == pytest.approx((1 + e) / (1 + 2 * e), abs=1e-6)
    assert out[5, 8] == pytest.approx(1.0, abs=1e-6) and out[5, 11] == 0.0


def test_feather_reflect_padding_keeps_a_full_mask_full():
    out = feather_mask(np.ones((15, 40), np.float32), 5)
    assert np.allclose(out, 1.0, atol=1e-6)


def test_feather_matches_an_independent_reflect_convolution():
    mask = (np.random.default_rng(2).random((17, 23)) > 0.6).astype(np.float32)
    kernel_size = feather_kernel_size(mask.shape, 5)
    x = np.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size)
    weights = np.exp(-0.5 * (x / 10) ** 2)
    weights /= weights.sum()
    half = kernel_size // 2
    padded = np.pad(mask.astype(np.float64), half, mode="reflect")  # numpy "reflect" = no edge repeat
    rows = np.apply_along_axis(lambda r: np.convolve(r, weights, mode="valid"), 1, padded)
    expected = np.apply_along_axis(lambda c: np.convolve(c, weights, mode="valid"), 0, rows)
    assert np.allclose(feather_mask(mask, 5), expected, atol=1e-6)


def test_large_feather_on_a_tiny_crop_uses_the_small_kernel():
    mask = (np.random.default_rng(3).random((6, 40)) > 0.5).astype(np.float32)
    assert np.allclose(feather_mask(mask, 100), feather_mask(mask, 1))  # both K = 3
    tiny = mask[:2]
    assert np.array_equal(feather_mask(tiny, 100), tiny)


# --- paste ------------------------------------------------------------------------------------


def test_paste_formula_on_float_images():
    image = np.zeros((10, 10, 3), np.float32)
    refined = np.ones((4, 4, 3), np.float32)
    out = paste(image, refined, np.full((4, 4), 0.25, np.float32), (2, 3, 6, 7))
    assert np.allclose(out[3:7, 2:6], 0.25)
    out[3:7, 2:6] = 0
    assert not out.any()
    assert not image.any()  # a new image is returned


def test_paste_on_uint8_blends_comfy_floats_and_truncates_as_save_image():
    image = np.full((6, 6, 3), 100, np.uint8)
    refined = np.full((2, 3, 3), 202, np.uint8)
    out = paste(image, refined, np.full((2, 3), 0.3, np.float32), (1, 1, 4, 3))
    assert out.dtype == np.uint8
    assert np.all(out[1:3, 1:4] == 130)  # 0.7·100 + 0.3·202 = 130.6: SaveImage truncates (rounding gave 131)
    assert np.all(out[3:] == 100)


def test_uint8_paste_equals_comfyui_float_paste_then_save_image_on_random_values():
    """Decision 11: ComfyUI pastes x/255 in float32 (``tensor_paste``) and SaveImage truncates 255·x."""
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    refined = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = rng.random((20, 30)).astype(np.float32)
    mask[:5] = 0.0
    out = paste(image, refined, mask, (10, 7, 40, 27))
    to_float = lambda x: x.astype(np.float32) / 255.0  # noqa: E731  (LoadImage)
    comfy = to_float(image).copy()
    m = mask[..., None]
    comfy[7:27, 10:40] = (1 - m) * comfy[7:27, 10:40] + m * to_float(refined)  # tensor_paste
    expected = np.clip(255.0 * comfy, 0, 255).astype(np.uint8)  # SaveImage
    assert np.array_equal(out, expected)
    rounded = np.clip(np.rint(255.0 * comfy), 0, 255).astype(np.uint8)
    assert (rounded != expected).sum() > 300  # the rule matters on this input (668 of 1800 values)


def test_save_image_bytes_round_trips_every_byte():
    values = np.arange(256, dtype=np.uint8)
    assert np.array_equal(save_image_bytes(to_comfy_float(values)), values)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_binary_mask_replaces_exactly_the_masked_pixels(dtype):
    rng = np.random.default_rng(4)
    scale = 255 if dtype == np.uint8 else 1
    image = (rng.random((12, 14, 3)) * scale).astype(dtype)
    refined = (rng.random((6, 8, 3)) * scale).astype(dtype)
    mask = np.zeros((6, 8), np.float32)
    mask[2:4, :] = 1
    mask[:, 3] = 1
    out = paste(image, refined, feather_mask(mask, 0), (4, 5, 12, 11))
    region = out[5:11, 4:12]
    assert np.array_equal(region[mask == 1], refined[mask == 1])
    assert np.array_equal(region[mask == 0], image[5:11, 4:12][mask == 0])
    outside = np.ones((12, 14), bool)
    outside[5:11, 4:12] = False
    assert np.array_equal(out[outside], image[outside])


def test_unmasked_pixels_are_bit_identical_even_if_the_refined_crop_is_not_finite():
    image = np.random.default_rng(5).random((5, 5, 3))
    refined = np.full((5, 5, 3), np.nan)
    mask = np.zeros((5, 5), np.float32)
    mask[2, 2] = 0.5
    out = paste(image, refined, mask, (0, 0, 5, 5))
    keep = mask == 0
    assert np.array_equal(out[keep], image[keep])
    assert out.dtype == image.dtype


def test_paste_resizes_a_mask_of_another_size():
    image = np.zeros((8, 8, 3), np.float32)
    out = paste(image, np.ones((4, 4, 3), np.float32), np.ones((2, 2), np.float32), (0, 0, 4, 4))
    assert np.array_equal(out[:4, :4], np.ones((4, 4, 3), np.float32))


def test_overlapping_crops_are_pasted_in_order():
    """The second face's crop is taken from the image that already holds the first paste (§6)."""

    def refine(current, crop):  # a stand-in refiner: brighten the crop it is given
        x1, y1, x2, y2 = crop
        return current[y1:y2, x1:x2] + 0.25

    image = np.zeros((9, 9, 3), np.float32)
    for crop in [(0, 0, 6, 6), (3, 3, 9, 9)]:
        image = paste(image, refine(image, crop), np.ones((6, 6), np.float32), crop)
    assert np.allclose(image[4, 4], 0.5)  # both
    assert np.allclose(image[1, 1], 0.25) and np.allclose(image[8, 8], 0.25)
    assert np.allclose(image[0, 8], 0.0)


def test_paste_rejects_bad_regions_and_crops():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError):
        paste(image, np.zeros((4, 4, 3), np.uint8), np.ones((4, 4)), (6, 6, 10, 10))
    with pytest.raises(ValueError):
        paste(image, np.zeros((3, 4, 3), np.uint8), np.ones((4, 4)), (0, 0, 4, 4))
    with pytest.raises(TypeError):
        paste(image, np.zeros((4, 4, 3), np.float32), np.ones((4, 4)), (0, 0, 4, 4))


# --- RGBA and resizes -------------------------------------------------------------------------


def test_rgba_alpha_is_the_paste_mask():
    refined = np.full((3, 4, 3), 0.5, np.float32)
    mask = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    rgba = rgba_with_alpha(refined, mask)
    assert rgba.shape == (3, 4, 4) and rgba.dtype == np.float32
    assert np.array_equal(rgba[..., 3], mask) and np.array_equal(rgba[..., :3], refined)
    as_u8 = rgba_with_alpha(np.zeros((3, 4, 3), np.uint8), mask)
    assert as_u8.dtype == np.uint8 and as_u8[2, 3, 3] == 255 and as_u8[0, 0, 3] == 0


def test_resize_image_takes_width_height_and_keeps_uint8():
    image = np.full((10, 20, 3), 77, np.uint8)
    out = resize_image(image, (40, 5))
    assert out.shape == (5, 40, 3) and out.dtype == np.uint8
    assert np.all(out == 77)


def test_resize_image_quantises_float_input_by_truncation():
    image = np.array([[[0.5, 0.999, 1.5]]], np.float32).repeat(4, 0).repeat(4, 1)
    out = resize_image(image, (4, 4))  # same size: still quantised, as the reference
    assert out.dtype == np.float32
    assert np.allclose(out[0, 0], np.array([127, 254, 255]) / 255)


def test_resize_mask_is_bilinear_with_half_pixel_centres():
    out = resize_mask(np.array([[0, 1], [0, 1]], np.float32), (4, 2))
    assert np.allclose(out, [[0, 0.25, 0.75, 1], [0, 0.25, 0.75, 1]])
