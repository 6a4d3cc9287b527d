"""Seam options and the seam metric on synthetic cases with known answers (issue 10).

Colour matching (facedetailer/color_match.py), multi-band blending and blend_face
(facedetailer/blend.py), the seam metric (facedetailer/seam_metric.py).
"""

import numpy as np
import pytest
from skimage import color

from facedetailer.blend import (
    blend_face,
    crop_edge_window,
    feather_mask,
    multiband_paste,
    paste,
    pyramid_levels,
)
from facedetailer.color_match import context_ring, match_colors, statistics_weights
from facedetailer.seam_metric import mask_in_image, seam_bands, seam_metric

SKIN = (180, 140, 120)
CAST = (205, 128, 96)  # the same skin, warmer and brighter: a typical VAE/sampler drift
CROP = (40, 30, 200, 170)  # x1, y1, x2, y2 inside a 200×240 image


def delta_e(rgb_a, rgb_b) -> float:
    lab = color.rgb2lab(np.array([[rgb_a, rgb_b]], np.uint8))
    return float(color.deltaE_ciede2000(lab[0, 0], lab[0, 1]))


def flat(shape, rgb) -> np.ndarray:
    image = np.empty((*shape, 3), np.uint8)
    image[:] = rgb
    return image


def square_face(size=(140, 160), box=(40, 100, 50, 110)) -> np.ndarray:
    mask = np.zeros(size, np.float32)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 1
    return mask


def textured(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    base = np.stack([120 + 0.4 * xx, 90 + 0.5 * yy, 110 + 0.2 * (xx - yy)], axis=-1)
    return np.clip(base + rng.normal(0, 15, base.shape), 0, 255).astype(np.uint8)


def run_blend(source, refined, face, feather=5, **options):
    paste_mask = feather_mask(face, feather)
    result, pasted = blend_face(source, refined, paste_mask, CROP, face_mask=face, **options)
    return result, pasted, mask_in_image(source.shape, paste_mask, CROP)


# --- colour matching ---------------------------------------------------------------------------


def test_flat_crop_with_a_known_cast_none_scores_the_cast_and_mean_std_brings_it_to_zero():
    source = flat((200, 240), SKIN)
    refined = flat((140, 160), CAST)
    face = square_face()
    expected = delta_e(CAST, SKIN)
    assert expected > 5  # a clearly visible cast
    plain, _, full_mask = run_blend(source, refined, face)
    assert seam_metric(plain, source, full_mask).delta_e == pytest.approx(expected, abs=0.05)
    for method in ("mean_std", "histogram"):
        matched, pasted, _ = run_blend(source, refined, face, color_match=method)
        score = seam_metric(matched, source, full_mask)
        assert score.delta_e < 0.3, (method, score)
        assert np.abs(pasted.astype(int) - np.array(SKIN)).max() <= 1, method


def test_strength_interpolates_and_zero_is_the_plain_paste():
    source = flat((200, 240), SKIN)
    refined = flat((140, 160), CAST)
    face = square_face()
    plain, plain_crop, full_mask = run_blend(source, refined, face)
    off, off_crop, _ = run_blend(source, refined, face, color_match="mean_std", color_match_strength=0.0)
    assert np.array_equal(off, plain) and off_crop is refined
    full_cast = seam_metric(plain, source, full_mask).delta_e
    half, _, _ = run_blend(source, refined, face, color_match="mean_std", color_match_strength=0.5)
    assert 0.35 * full_cast < seam_metric(half, source, full_mask).delta_e < 0.65 * full_cast


def test_histogram_undoes_a_monotone_tone_curve_that_mean_std_cannot():
    original = textured((140, 160))
    lab = color.rgb2lab(original)
    centre = np.median(lab[..., 0])
    lab[..., 0] = centre + 8 + 25 * np.tanh((lab[..., 0] - centre) / 5)  # a steep S-curve: far from affine
    lab[..., 1] += 6
    refined = np.rint(np.clip(color.lab2rgb(lab), 0, 1) * 255).astype(np.uint8)
    face = square_face()
    region = statistics_weights(face) > 0

    def error(matched: np.ndarray) -> float:
        difference = color.deltaE_ciede2000(color.rgb2lab(matched), color.rgb2lab(original))
        return float(difference[region].mean())

    before = error(refined)
    histogram = error(match_colors(refined, original, face, method="histogram"))
    mean_std = error(match_colors(refined, original, face, method="mean_std"))
    assert before > 8
    assert histogram < 0.5 < mean_std < before


def test_mean_std_gives_the_original_weighted_mean_and_deviation():
    original = textured((140, 160), seed=1)
    refined = np.clip(original.astype(np.float32) * 0.7 + 50, 0, 255).astype(np.uint8)  # flatter, lifted
    face = square_face()
    weights = statistics_weights(face)
    region = weights > 0
    matched = match_colors(refined, original, face, method="mean_std")
    for image_a, image_b in ((matched, original),):
        lab_a, lab_b = color.rgb2lab(image_a)[region], color.rgb2lab(image_b)[region]
        w = weights[region]
        mean_a, mean_b = w @ lab_a, w @ lab_b
        std_a = np.sqrt(w @ (lab_a - mean_a) ** 2)
        std_b = np.sqrt(w @ (lab_b - mean_b) ** 2)
        assert np.allclose(mean_a, mean_b, atol=0.5), (mean_a, mean_b)
        assert np.allclose(std_a, std_b, rtol=0.05, atol=0.3), (std_a, std_b)


def test_colour_matching_changes_only_pixels_under_the_paste_mask():
    source = textured((200, 240), seed=2)
    refined = flat((140, 160), CAST)
    face = square_face()
    result, _, full_mask = run_blend(source, refined, face, feather=3, color_match="histogram")
    plain, _, _ = run_blend(source, refined, face, feather=3)
    assert np.array_equal(result[full_mask == 0], source[full_mask == 0])
    assert not np.array_equal(result[full_mask > 0.5], plain[full_mask > 0.5])


def test_ring_is_outside_the_face_within_its_width_and_weights_split_half_half():
    face = square_face((60, 60), (20, 40, 20, 40)).astype(bool)
    ring = context_ring(face, 4)
    assert not (ring & face).any()
    assert ring[30, 16:20].all() and not ring[30, 15] and ring[16, 30] and not ring[15, 30]
    assert ring[18, 18] and not ring[17, 17]  # diagonal from the corner (20, 20): √8 ≤ 4 < √18
    weights = statistics_weights(face.astype(np.float32))
    assert weights.sum() == pytest.approx(1.0)
    assert weights[face].sum() == pytest.approx(0.5)
    # a ring widened to wherever the paste mask reaches
    paste_mask = feather_mask(face.astype(np.float32), 10)
    wide = statistics_weights(face.astype(np.float32), paste_mask) > 0
    assert wide[(paste_mask > 0) & ~face].all()


def test_colour_match_rejects_unknown_methods_and_strengths():
    crop = flat((20, 20), SKIN)
    with pytest.raises(ValueError, match="color_match"):
        match_colors(crop, crop, np.ones((20, 20)), method="lab")
    with pytest.raises(ValueError, match="strength"):
        match_colors(crop, crop, np.ones((20, 20)), method="mean_std", strength=1.5)
    with pytest.raises(ValueError, match="blend"):
        blend_face(flat((40, 40), SKIN), crop, np.ones((20, 20)), (0, 0, 20, 20), blend="poisson")


# --- multi-band blending -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "levels"),
    [((15, 100), 0), ((16, 16), 1), ((31, 40), 1), ((32, 40), 2), ((450, 600), 5), ((4096, 4096), 8)],
)
def test_pyramid_levels_follow_the_crop_size(shape, levels):
    assert pyramid_levels(shape) == levels


def test_hard_step_multiband_lowers_the_boundary_gradient_energy_without_raising_delta_e():
    source = flat((200, 240), SKIN)
    refined = flat((140, 160), CAST)
    face = square_face()
    for feather in (0, 5):
        feathered, _, full_mask = run_blend(source, refined, face, feather=feather)
        multiband, _, _ = run_blend(source, refined, face, feather=feather, blend="multiband")
        plain, bands = seam_metric(feathered, source, full_mask), seam_metric(multiband, source, full_mask)
        assert bands.gradient_energy < 0.5 * plain.gradient_energy, (feather, plain, bands)
        assert bands.delta_e <= plain.delta_e, (feather, plain, bands)
        assert not np.array_equal(multiband[full_mask > 0.99], feathered[full_mask > 0.99])  # it does blend


def test_multiband_leaves_outside_the_crop_and_free_crop_edges_untouched():
    source = textured((200, 240), seed=3)
    refined = flat((140, 160), CAST)
    face = square_face()
    result, _, _ = run_blend(source, refined, face, blend="multiband")
    x1, y1, x2, y2 = CROP
    outside = np.ones(source.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(result[outside], source[outside])
    crop_result, crop_source = result[y1:y2, x1:x2], source[y1:y2, x1:x2]
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        assert np.array_equal(crop_result[edge], crop_source[edge])  # no square
    assert not np.array_equal(crop_result[1:-1, 1:-1], crop_source[1:-1, 1:-1])


def test_crop_edge_window_ramps_only_on_edges_inside_the_image():
    window = crop_edge_window((0, 10, 50, 40), (100, 50), width=8)  # touches left and right borders
    assert window.shape == (30, 50)
    assert (window[0] == 0).all() and (window[-1] == 0).all()
    assert window[15, 0] == 1 and window[15, -1] == 1 and window[15, 25] == 1
    assert 0 < window[4, 25] < 1


def test_multiband_identities():
    image = textured((200, 240), seed=4)
    x1, y1, x2, y2 = CROP
    original = image[y1:y2, x1:x2]
    face = square_face()
    # refined equal to the original: nothing changes, bit for bit
    assert np.array_equal(multiband_paste(image, original.copy(), feather_mask(face, 5), CROP), image)
    # an empty mask: nothing changes
    other = textured((140, 160), seed=5)
    assert np.array_equal(multiband_paste(image, other, np.zeros((140, 160), np.float32), CROP), image)
    # a full mask: the refined crop comes through (pyramid collapse is exact to float error)
    full = multiband_paste(image, other, np.ones((140, 160), np.float32), CROP)
    assert np.abs(full[y1:y2, x1:x2].astype(int) - other.astype(int)).max() <= 1
    # no levels: the plain paste
    mask = feather_mask(face, 5)
    assert np.array_equal(multiband_paste(image, other, mask, CROP, levels=0), paste(image, other, mask, CROP))
    # float images give the uint8 result to within rounding
    as_float = multiband_paste(image / 255.0, other / 255.0, mask, CROP)
    as_uint8 = multiband_paste(image, other, mask, CROP)
    assert np.abs(as_float * 255 - as_uint8).max() <= 0.51


# --- the seam metric ---------------------------------------------------------------------------


def test_metric_is_zero_for_an_unchanged_image():
    source = textured((120, 120))
    mask = feather_mask(square_face((120, 120), (30, 90, 30, 90)), 5)
    score = seam_metric(source.copy(), source, mask)
    assert score.delta_e == pytest.approx(0, abs=1e-9) and score.gradient_excess == 0
    assert score.inner_pixels > 0 and score.outer_pixels > 0


def test_metric_ignores_the_sources_own_step_and_scores_only_the_paste():
    """Source: face colour A inside, background B outside; the paste turns A into A'."""
    background, face_colour, cast = (40, 90, 160), SKIN, CAST
    face = square_face((120, 120), (30, 90, 30, 90))
    source = flat((120, 120), background)
    source[face == 1] = face_colour
    result = source.copy()
    result[face == 1] = cast
    score = seam_metric(result, source, face)
    assert delta_e(face_colour, background) > 30
    assert score.delta_e == pytest.approx(delta_e(cast, face_colour), abs=0.05)


def test_gradient_energy_of_a_straight_hard_step_has_its_closed_form():
    """Left half pasted with colour C over a flat source S, hard mask, bands of w px: the profile
    across the boundary has 2·w one-px bins and one step of ΔLab, so the mean squared step is
    |ΔLab|² / (2·w − 1)."""
    width = 4
    source = flat((64, 64), SKIN)
    result = source.copy()
    result[:, :32] = CAST
    mask = np.zeros((64, 64), np.float32)
    mask[:, :32] = 1
    step = color.rgb2lab(np.array([[CAST]], np.uint8))[0, 0] - color.rgb2lab(np.array([[SKIN]], np.uint8))[0, 0]
    score = seam_metric(result, source, mask, band_width=width)
    assert score.source_gradient_energy == 0
    assert score.gradient_energy == pytest.approx(float(step @ step) / (2 * width - 1), rel=1e-6)
    assert score.gradient_excess == pytest.approx(score.gradient_energy)  # source floored at 1


def test_gradient_excess_sees_the_seam_not_the_texture():
    """Noise added inside a hard paste is texture, not a seam: it barely moves the excess; a cast does."""
    source = textured((128, 128), seed=6)
    mask = square_face((128, 128), (32, 96, 32, 96))
    noise = np.random.default_rng(7).normal(0, 12, source.shape)
    noisy = np.clip(source + noise * (mask[..., None] > 0.5), 0, 255).astype(np.uint8)
    cast = np.clip(source + np.array([22, -10, -20]) * mask[..., None], 0, 255).astype(np.uint8)
    noisy_score, cast_score = seam_metric(noisy, source, mask), seam_metric(cast, source, mask)
    assert cast_score.gradient_excess > 2
    assert abs(noisy_score.gradient_excess) < 0.1 * cast_score.gradient_excess, (noisy_score, cast_score)
    assert noisy_score.delta_e < 0.3 * cast_score.delta_e


def test_bands_sit_on_either_side_of_the_feather_transition():
    mask = np.zeros((64, 100), np.float32)
    mask[:, :50] = 1
    bands = seam_bands(feather_mask(mask, 5), band_width=3)  # K = 11: transition 10 px wide
    row = 30
    inner_cols, outer_cols = np.nonzero(bands.inner[row])[0], np.nonzero(bands.outer[row])[0]
    assert len(inner_cols) == 3 and len(outer_cols) == 3
    assert inner_cols.max() < 45 and outer_cols.min() > 54
    assert 9 <= bands.transition_width <= 12


def test_mask_in_image_and_input_checks():
    full = mask_in_image((50, 60, 3), np.ones((10, 20), np.float32), (5, 7, 25, 17))
    assert full.sum() == 200 and full[7:17, 5:25].all()
    with pytest.raises(ValueError, match="shape"):
        seam_metric(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 11, 3), np.uint8), np.zeros((10, 10)))
    with pytest.raises(ValueError, match="image-sized"):
        seam_metric(np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10, 3), np.uint8), np.zeros((9, 10)))
