"""Upscale decision (spec §4; reference §6.2, §14, Q11); vectors use guide_size=512, max_size=1024."""

import pytest

from facedetailer.guide_size import UpscalePlan, plan_upscale

VECTORS = {
    "A": ((241, 298), (400.3, 300.7, 480.9, 400.2)),
    "B": ((300, 390), (10, 20, 110, 150)),
    "C": ((832, 1216), (300, 200, 700, 700)),
    "D": ((90, 108), (200, 200, 230, 236)),
}


def plan(case_or_crop, bbox=None, *, for_bbox=True, force=True, guide=512, max_size=1024):
    crop, box = VECTORS[case_or_crop] if bbox is None else (case_or_crop, bbox)
    return plan_upscale(
        crop, box, guide_size=guide, guide_size_for_bbox=for_bbox, max_size=max_size, force_inpaint=force
    )


@pytest.mark.parametrize("force", [True, False])
@pytest.mark.parametrize(
    ("case", "for_bbox", "upscale", "size"),
    [
        ("A", True, 3.4362, (828, 1024)),
        ("A", False, 2.1245, (512, 633)),
        ("B", True, 2.6267, (788, 1024)),
        ("B", False, 1.7067, (512, 665)),
        ("D", True, 9.4825, (853, 1024)),
        ("D", False, 5.6889, (512, 614)),
    ],
)
def test_reference_vectors(case, for_bbox, upscale, size, force):
    # with force_inpaint off A, B and D give the same numbers: their bbox is smaller than guide_size
    result = plan(case, for_bbox=for_bbox, force=force)
    assert not result.skip and result.reason is None
    assert result.upscale == pytest.approx(upscale, abs=1e-4)
    assert result.new_size == size


@pytest.mark.parametrize("for_bbox", [True, False])
def test_big_face_c_is_sampled_at_1x_with_force_inpaint(for_bbox):
    assert plan("C", for_bbox=for_bbox, force=True) == UpscalePlan(
        skip=False, reason="force inpaint", upscale=1.0, new_size=(832, 1216)
    )


@pytest.mark.parametrize("for_bbox", [True, False])
def test_big_face_c_is_skipped_without_force_inpaint(for_bbox):
    result = plan("C", for_bbox=for_bbox, force=False)
    assert result.skip and result.reason == "upscale <= 1"
    assert result.upscale == pytest.approx(0.8424 if for_bbox else 0.6154, abs=1e-4)


def test_max_size_caps_the_longer_side_from_the_truncated_sizes():
    # A uncapped: s = 512/80.6 → 1530×1893; capped at 1024: s·1024/1893 → 828×1024
    uncapped = plan("A", max_size=16384)
    assert uncapped.new_size == (1530, 1893)
    assert uncapped.upscale == pytest.approx(512 / 80.6)
    assert plan("A").upscale == pytest.approx(512 / 80.6 * 1024 / 1893)


def test_max_size_not_reached_leaves_the_upscale_alone():
    result = plan((1000, 900), (0, 0, 600, 500), force=False)
    assert result == UpscalePlan(skip=False, reason=None, upscale=1.024, new_size=(1024, 921))


def test_enough_big_skips_only_without_force_inpaint():
    assert plan((800, 800), (0, 0, 600, 600), force=False) == UpscalePlan(True, "enough big", 1.0, (800, 800))
    forced = plan((800, 800), (0, 0, 600, 600), force=True)  # Q11: resampled at 1×
    assert (forced.skip, forced.upscale, forced.new_size) == (False, 1.0, (800, 800))


def test_enough_big_is_inclusive_and_needs_both_sides():
    assert plan((900, 900), (0, 0, 512, 512), force=False).reason == "enough big"
    assert not plan((900, 900), (0, 0, 600, 500), force=False).skip


def test_enough_big_measures_the_bbox_even_in_crop_region_mode():
    # the crop (300×300) would be upscaled, but the bbox is already ≥ guide_size
    result = plan((300, 300), (0, 0, 600, 600), for_bbox=False, force=False)
    assert result.skip and result.reason == "enough big"


def test_upscale_exactly_one_is_skipped_without_force_inpaint():
    result = plan((300, 400), (0, 0, 100, 100), for_bbox=False, force=False, guide=300)
    assert result.skip and result.reason == "upscale <= 1" and result.upscale == 1.0


def test_zero_size_crop():
    skipped = plan((0, 50), (0, 0, 20, 20), force=False, guide=64)
    assert skipped.skip and skipped.reason == "zero size"
    assert plan((0, 50), (0, 0, 20, 20), force=True, guide=64).new_size == (0, 50)
