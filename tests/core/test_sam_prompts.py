"""SAM prompts, mask selection and union (spec §3; reference §4.2–4.4, Q2, Q12)."""

import numpy as np
import pytest

from facedetailer.sam_prompts import SamPrompt, combine_sam_masks, make_sam_prompts, select_sam_masks
from facedetailer.segs import SEG, SEGS

IMAGE_HW = (200, 300)  # H, W


def seg(bbox, crop_region=(70, 20, 190, 140), mask=None, label="face"):
    x1, y1, x2, y2 = crop_region
    if mask is None:
        mask = np.zeros((y2 - y1, x2 - x1), np.float32)
    return SEG(crop_region=crop_region, bbox=bbox, cropped_mask=mask, confidence=0.9, label=label)


def prompts_for(segs, hint, expansion=0, negative="False", threshold=0.7, shape=IMAGE_HW):
    return make_sam_prompts(
        SEGS(shape, segs),
        detection_hint=hint,
        bbox_expansion=expansion,
        mask_hint_threshold=threshold,
        mask_hint_use_negative=negative,
    )


FACE = (100, 50, 160, 110)  # centre (130, 80), 60×60


@pytest.mark.parametrize(
    ("hint", "points"),
    [
        ("center-1", [(130, 80)]),
        ("mask-point-bbox", [(130, 80)]),  # identical to center-1 (Q12)
        ("horizontal-2", [(120, 80), (140, 80)]),
        ("vertical-2", [(130, 70), (130, 90)]),
        ("rect-4", [(120, 80), (140, 80), (130, 70), (130, 90)]),
        ("diamond-4", [(120, 70), (140, 70), (120, 90), (140, 90)]),
        ("none", []),
    ],
)
def test_hint_points_without_expansion(hint, points):
    [prompt] = prompts_for([seg(FACE)], hint)
    assert prompt == SamPrompt(box=FACE, points=tuple(points), labels=(1,) * len(points))


@pytest.mark.parametrize(
    ("hint", "points"),
    [
        ("center-1", [(130, 80)]),  # the centre stays the bbox's
        ("horizontal-2", [(110, 80), (150, 80)]),  # thirds of the expanded box, y of the bbox centre
        ("vertical-2", [(130, 60), (130, 100)]),
        ("rect-4", [(110, 80), (150, 80), (130, 60), (130, 100)]),
        ("diamond-4", [(110, 60), (150, 60), (110, 100), (150, 100)]),
    ],
)
def test_hint_points_with_expansion_30(hint, points):
    [prompt] = prompts_for([seg(FACE)], hint, expansion=30)
    assert prompt.box == (70, 20, 190, 140)
    assert prompt.points == tuple(points)


def test_expanded_box_is_clamped_at_the_top_left_border():
    [prompt] = prompts_for([seg((10, 5, 70, 45))], "horizontal-2", expansion=20)
    assert prompt.box == (0, 0, 90, 65)
    assert prompt.points == ((30, 25), (60, 25))  # gap 90/3 from x=0; y = bbox centre 25


def test_expanded_box_is_clamped_at_the_bottom_right_border():
    [prompt] = prompts_for([seg((250, 170, 290, 195))], "vertical-2", expansion=20)
    assert prompt.box == (230, 150, 300, 200)
    assert prompt.points == ((270, 150 + 50 / 3), (270, 150 + 100 / 3))


def test_mask_area_samples_a_grid_above_the_threshold():
    mask = np.zeros((25, 30), np.float32)  # steps max(3, 25//20) = 3 and max(3, 30//20) = 3
    mask[3:7, 6:10] = 1.0
    mask[0, 0] = 0.7  # equal to the threshold: not a point
    mask[0, 3] = 0.71
    [prompt] = prompts_for([seg((45, 33, 60, 50), crop_region=(40, 30, 70, 55), mask=mask)], "mask-area")
    assert prompt.points == ((43, 30), (46, 33), (49, 33), (46, 36), (49, 36))
    assert prompt.labels == (1, 1, 1, 1, 1)
    assert prompt.box == (45, 33, 60, 50)


def test_mask_area_small_adds_background_points_where_the_mask_is_zero():
    mask = np.zeros((25, 30), np.float32)
    mask[3:7, 6:10] = 1.0
    mask[0, 0] = 0.7
    mask[0, 3] = 0.71
    [prompt] = prompts_for([seg((45, 33, 60, 50), (40, 30, 70, 55), mask)], "mask-area", negative="Small")
    grid = 9 * 10  # rows 0,3,…,24 × cols 0,3,…,27
    assert len(prompt.points) == grid - 1  # every sample but the 0.7 one
    assert prompt.labels.count(1) == 5 and prompt.labels.count(0) == grid - 6
    assert (40, 30) not in prompt.points
    assert prompt.labels[prompt.points.index((40, 33))] == 0


def test_mask_area_grid_step_grows_with_the_crop():
    mask = np.ones((70, 100), np.float32)  # steps: x max(3, 100//20) = 5, y max(3, 70//20) = 3
    [prompt] = prompts_for([seg((60, 60, 90, 90), (50, 40, 150, 110), mask)], "mask-area")
    xs = sorted({x for x, _ in prompt.points})
    ys = sorted({y for _, y in prompt.points})
    assert xs == [50 + x for x in range(0, 100, 5)]
    assert ys == [40 + y for y in range(0, 70, 3)]
    assert len(prompt.points) == 20 * 24


def test_outter_grid_uses_the_real_width_and_height():
    # Decision 2 (Q2 fixed): x over [10, W-10) step max(3, W//20) = 10, y over [10, H-10) step 5
    [prompt] = prompts_for(
        [seg((5, 5, 40, 30), crop_region=(0, 0, 50, 40))], "none", negative="Outter", shape=(100, 200)
    )
    assert prompt.labels == (0,) * len(prompt.points)
    xs = {x for x, _ in prompt.points}
    ys = {y for _, y in prompt.points}
    assert xs == set(range(10, 190, 10)) and ys == set(range(10, 90, 5))
    # excluded: within 10 px of the crop region, i.e. x <= 60 and y <= 50 (6 × 9 samples)
    assert len(prompt.points) == 18 * 16 - 6 * 9
    assert (60, 50) not in prompt.points and (70, 50) in prompt.points and (60, 55) in prompt.points
    assert (180, 85) in prompt.points


def test_outter_negatives_follow_the_hint_points():
    [prompt] = prompts_for([seg(FACE)], "center-1", negative="Outter")
    assert prompt.points[0] == (130, 80) and prompt.labels[0] == 1
    assert set(prompt.labels[1:]) == {0}
    for x, y in prompt.points[1:]:
        assert not (60 <= x <= 200 and 10 <= y <= 150)  # crop (70, 20, 190, 140) grown by 10


@pytest.mark.parametrize(("negative", "labels"), [("False", (1, 1, 1)), ("Small", (1, 0, 1)), ("Outter", (1, 1, 1))])
def test_mask_points_is_one_prompt_of_centres_without_a_box(negative, labels):
    segs = [seg(FACE), seg((10, 10, 18, 30)), seg((200, 100, 210, 120))]  # widths 60, 8, 10
    [prompt] = prompts_for(segs, "mask-points", negative=negative)
    assert prompt == SamPrompt(box=None, points=((130, 80), (14, 20), (205, 110)), labels=labels)


def test_mask_points_without_segs_gives_no_prompt():
    assert prompts_for([], "mask-points") == []
    assert prompts_for([], "center-1") == []


def test_one_prompt_per_seg_in_order():
    prompts = prompts_for([seg(FACE), seg((10, 10, 40, 40))], "center-1")
    assert [p.points for p in prompts] == [((130, 80),), ((25, 25),)]


def test_unknown_hint_is_rejected():
    with pytest.raises(ValueError, match="sam_detection_hint"):
        prompts_for([seg(FACE)], "center-2")


# --- selection and union ----------------------------------------------------------------------


def masks(n, shape=(4, 4)):
    out = np.zeros((n, *shape), bool)
    for k in range(n):
        out[k].flat[k] = True
    return out


def test_selection_keeps_every_mask_at_or_above_the_threshold():
    candidates = masks(3)
    kept = select_sam_masks(candidates, np.array([0.95, 0.93, 0.5]), 0.93)
    assert len(kept) == 2
    assert np.array_equal(kept[0], candidates[0]) and np.array_equal(kept[1], candidates[1])


def test_selection_falls_back_to_the_first_best_mask():
    candidates = masks(3)
    [kept] = select_sam_masks(candidates, np.array([0.5, 0.8, 0.8]), 0.93)
    assert np.array_equal(kept, candidates[1])


@pytest.mark.parametrize("scores", [[0.0, 0.0, 0.0], [-0.2, 0.0, -1.0]])
def test_selection_gives_nothing_when_the_best_score_is_not_positive(scores):
    assert select_sam_masks(masks(3), np.array(scores), 0.93) == []


def test_threshold_zero_keeps_every_mask():
    assert len(select_sam_masks(masks(3), np.array([0.0, 0.1, 0.2]), 0.0)) == 3


def test_union_of_masks():
    a = np.zeros((5, 6), bool)
    b = np.zeros((5, 6), bool)
    a[0, 0] = b[4, 5] = True
    union = combine_sam_masks([a, b], (5, 6), 0)
    assert union.dtype == np.float32
    assert union.sum() == 2 and union[0, 0] == 1 and union[4, 5] == 1


def test_union_then_dilate_or_erode():
    core = np.zeros((12, 12), bool)
    core[4:8, 4:8] = True
    grown = combine_sam_masks([core], (12, 12), 3)
    shrunk = combine_sam_masks([core], (12, 12), -3)
    assert np.array_equal(np.flatnonzero(grown.any(axis=1)), np.arange(3, 9))
    assert np.array_equal(np.flatnonzero(shrunk.any(axis=1)), np.arange(5, 7))


def test_no_mask_gives_an_empty_mask():
    empty = combine_sam_masks([], (3, 4), 5)
    assert empty.shape == (3, 4) and empty.dtype == np.float32 and not empty.any()
