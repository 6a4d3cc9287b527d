"""Detection → SEGS (spec §2.1–2.2; reference §3.2–3.4, §4.5, §7.4, §14)."""

import numpy as np
import pytest

from facedetailer.segs import (
    SEG,
    SEGS,
    Detection,
    detections_to_segs,
    dilate_mask,
    make_crop_region,
    segs_bitwise_and_mask,
    segs_to_combined_mask,
)


def rows_and_cols(mask):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


# --- make_crop_region -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "image_wh", "bbox", "expected"),
    [
        ("A", (1024, 1024), (400.3, 300.7, 480.9, 400.2), (319, 201, 560, 499)),
        ("B edge shift", (1024, 1024), (10, 20, 110, 150), (0, 0, 300, 390)),
        ("C whole image", (832, 1216), (300, 200, 700, 700), (0, 0, 832, 1216)),
        ("D tiny face", (512, 512), (200, 200, 230, 236), (170, 164, 260, 272)),
    ],
)
def test_crop_region_reference_vectors(case, image_wh, bbox, expected):
    assert make_crop_region(*image_wh, bbox, 3.0) == expected


def test_crop_region_right_edge_is_shifted_left_not_shrunk():
    # cx=980, cw=180 → start 890, 890+180 > 1024 → [1024-180, 1024]
    assert make_crop_region(1024, 1024, (950, 500, 1010, 560), 3.0) == (844, 440, 1024, 620)


def test_crop_region_top_edge_is_shifted_down():
    # cy=20, ch=120 → start -40 → [0, 120]
    assert make_crop_region(640, 480, (100, 0, 150, 40), 3.0) == (50, 0, 200, 120)


def test_crop_region_bottom_edge_is_shifted_up():
    # cy=459, ch=76 → start 421, 421+76 > 480 → [404, 480]
    assert make_crop_region(640, 480, (300, 440, 340, 478), 2.0) == (280, 404, 360, 480)


def test_crop_region_larger_than_the_image_on_one_axis_is_clamped_on_that_axis_only():
    # cw=300 > W=200 → [0, 200]; ch=150 fits → [350, 500]
    assert make_crop_region(200, 1000, (50, 400, 150, 450), 3.0) == (0, 350, 200, 500)


def test_crop_region_truncates_both_ends_toward_zero():
    # A: x end 319 + 241.8 = 560.8 → 560; y end 201 + 298.5 = 499.7 → 499
    x1, y1, x2, y2 = make_crop_region(1024, 1024, (400.3, 300.7, 480.9, 400.2), 3.0)
    assert (x2 - x1, y2 - y1) == (241, 298)


# --- dilation ---------------------------------------------------------------------------------


def block(rows, cols, shape=(30, 30)):
    mask = np.zeros(shape, np.float32)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = 1
    return mask


def test_dilation_10_grows_4_up_left_and_5_down_right():
    assert rows_and_cols(dilate_mask(block((5, 9), (5, 9)), 10)) == ((1, 14), (1, 14))


def test_dilation_2_grows_only_down_right():
    assert rows_and_cols(dilate_mask(block((5, 9), (5, 9)), 2)) == ((5, 10), (5, 10))


@pytest.mark.parametrize(("dilation", "expected"), [(-3, (6, 13)), (-4, (7, 13))])
def test_negative_dilation_erodes(dilation, expected):
    # Decision 1: eroding with a |d|×|d| kernel anchored at its centre
    assert rows_and_cols(dilate_mask(block((5, 14), (5, 14)), dilation)) == (expected, expected)


def test_zero_dilation_returns_an_unchanged_copy():
    mask = block((5, 9), (5, 9))
    out = dilate_mask(mask, 0)
    assert np.array_equal(out, mask) and out is not mask


def test_soft_mask_dilation_is_a_max_filter():
    mask = np.zeros((9, 9), np.float32)
    mask[4, 4] = 0.25
    out = dilate_mask(mask, 3)
    assert out.dtype == np.float32
    assert np.array_equal(out[3:6, 3:6], np.full((3, 3), 0.25, np.float32))
    assert out.sum() == pytest.approx(9 * 0.25)


# --- detections_to_segs -----------------------------------------------------------------------


def image_hw(height, width, dtype=np.uint8):
    return np.arange(height * width * 3, dtype=np.int64).reshape(height, width, 3).astype(dtype)


def test_bbox_mask_is_the_inclusive_integer_span():
    image = image_hw(40, 50)
    [seg] = detections_to_segs(
        image, [Detection("face", (10.7, 5.2, 30.4, 25.9), 0.9)], dilation=0, crop_factor=2.0, drop_size=10
    ).segs
    assert seg.crop_region == (0, 0, 39, 40)
    expected = np.zeros((40, 50), np.float32)
    expected[5:26, 10:31] = 1  # rows int(5.2)..int(25.9), cols int(10.7)..int(30.4), inclusive
    assert np.array_equal(seg.cropped_mask, expected[0:40, 0:39])
    assert seg.cropped_mask.dtype == np.float32


def test_seg_fields_and_cropped_image():
    image = image_hw(40, 50)
    segs = detections_to_segs(
        image, [Detection("face", (10.7, 5.2, 30.4, 25.9), 0.875)], dilation=0, crop_factor=2.0, drop_size=10
    )
    [seg] = segs.segs
    assert segs.shape == (40, 50)
    assert (seg.label, seg.confidence, seg.bbox) == ("face", 0.875, (10.7, 5.2, 30.4, 25.9))
    assert seg.cropped_image.dtype == np.uint8
    assert np.array_equal(seg.cropped_image, image[0:40, 0:39])


def test_dilation_changes_the_mask_but_not_bbox_or_crop_region():
    image = image_hw(64, 64)
    detection = Detection("face", (20, 20, 29.5, 29.5), 0.9)  # span rows/cols 20..29
    plain, grown, shrunk = (
        detections_to_segs(image, [detection], dilation=d, crop_factor=3.0, drop_size=5).segs[0] for d in (0, 10, -4)
    )
    assert plain.crop_region == grown.crop_region == shrunk.crop_region == (10, 10, 38, 38)
    assert plain.bbox == grown.bbox == shrunk.bbox
    # in crop coordinates (offset 10): 20..29 → 10..19; dilated 16..34 → 6..24; eroded 22..28 → 12..18
    assert rows_and_cols(plain.cropped_mask) == ((10, 19), (10, 19))
    assert rows_and_cols(grown.cropped_mask) == ((6, 24), (6, 24))
    assert rows_and_cols(shrunk.cropped_mask) == ((12, 18), (12, 18))


def test_dilation_near_the_image_border_matches_full_image_dilation():
    image = image_hw(30, 40)
    detection = Detection("face", (0, 1, 12, 14), 0.9)
    [seg] = detections_to_segs(image, [detection], dilation=7, crop_factor=1.5, drop_size=5).segs
    full = np.zeros((30, 40), np.float32)
    full[1:15, 0:13] = 1
    x1, y1, x2, y2 = seg.crop_region
    assert np.array_equal(seg.cropped_mask, dilate_mask(full, 7)[y1:y2, x1:x2])


@pytest.mark.parametrize(
    ("bbox", "kept"),
    [
        ((0, 0, 10, 30), False),  # width == drop_size
        ((0, 0, 30, 10), False),  # height == drop_size
        ((0, 0, 10.5, 10.5), True),  # drop_size + 0.5 on both sides
        ((0, 0, 10.5, 10.0), False),
    ],
)
def test_drop_size_is_strict_on_both_sides(bbox, kept):
    segs = detections_to_segs(image_hw(64, 64), [Detection("face", bbox, 0.9)], dilation=0, crop_factor=1, drop_size=10)
    assert (len(segs.segs) == 1) is kept


def test_drop_size_is_raised_to_one():
    image = image_hw(20, 20)
    detections = [Detection("a", (0, 0, 1.0, 5), 0.9), Detection("b", (0, 0, 1.5, 1.5), 0.8)]
    segs = detections_to_segs(image, detections, dilation=0, crop_factor=1, drop_size=0)
    assert [seg.label for seg in segs.segs] == ["b"]


def test_detection_order_is_kept():
    image = image_hw(100, 100)
    detections = [Detection(str(k), (10.0 * k, 10, 10.0 * k + 15, 30), c) for k, c in enumerate([0.3, 0.9, 0.6])]
    segs = detections_to_segs(image, detections, dilation=0, crop_factor=1.5, drop_size=10)
    assert [seg.label for seg in segs.segs] == ["0", "1", "2"]


def test_segm_mask_is_cut_to_the_crop_region():
    image = image_hw(40, 60)
    soft = (np.arange(40 * 60, dtype=np.float32).reshape(40, 60) / (40 * 60)).astype(np.float32)
    [seg] = detections_to_segs(
        image, [Detection("person", (20, 10, 40, 30), 0.8, mask=soft)], dilation=0, crop_factor=1.5, drop_size=10
    ).segs
    x1, y1, x2, y2 = seg.crop_region
    assert (x1, y1, x2, y2) == (15, 5, 45, 35)
    assert np.array_equal(seg.cropped_mask, soft[y1:y2, x1:x2])


def test_segm_mask_of_the_wrong_size_is_rejected():
    with pytest.raises(ValueError, match="segm mask shape"):
        detections_to_segs(
            image_hw(40, 60),
            [Detection("person", (20, 10, 40, 30), 0.8, mask=np.ones((60, 40), np.float32))],
            dilation=0,
            crop_factor=1.5,
            drop_size=10,
        )


def test_no_detection_gives_empty_segs_of_the_image_shape():
    segs = detections_to_segs(image_hw(7, 9), [], dilation=10, crop_factor=3, drop_size=10)
    assert segs.shape == (7, 9) and segs.segs == []


# --- mask algebra -----------------------------------------------------------------------------


def seg_at(crop_region, mask):
    return SEG(
        crop_region=crop_region, bbox=(0, 0, 1, 1), cropped_mask=np.asarray(mask, np.float32), confidence=1, label="x"
    )


def test_combined_mask_is_a_bytewise_or_not_a_max():
    segs = SEGS((4, 6), [seg_at((0, 0, 3, 2), np.full((2, 3), 0.5)), seg_at((2, 1, 5, 3), np.full((2, 3), 0.75))])
    combined = segs_to_combined_mask(segs)
    assert combined.dtype == np.float32 and combined.shape == (4, 6)
    assert combined[0, 0] == np.float32(127 / 255)  # u8(127.5) = 127
    assert combined[2, 4] == np.float32(191 / 255)  # u8(191.25) = 191
    assert combined[1, 2] == 1.0  # 127 | 191 = 255, although max(0.5, 0.75) = 0.75
    assert combined[3].sum() == 0 and combined[:, 5].sum() == 0


def test_combined_mask_of_no_segs_is_zero():
    assert not segs_to_combined_mask(SEGS((3, 4), [])).any()


def test_and_mask_is_bytewise_on_soft_values():
    segs = SEGS((2, 4), [seg_at((0, 0, 4, 2), [[0.5, 0.75, 1, 1], [0, 1, 0.5, 0.75]])])
    sam = np.array([[1, 0.5, 0, 1], [1, 1, 0.75, 0.75]], np.float32)
    [seg] = segs_bitwise_and_mask(segs, sam).segs
    expected = np.array([[127 & 255, 191 & 127, 0, 255], [0, 255, 127 & 191, 191]]) / 255
    assert np.array_equal(seg.cropped_mask, expected.astype(np.float32))
    assert seg.cropped_mask[0, 0] == np.float32(127 / 255)  # 0.5 & 1.0 → 127


def test_and_mask_is_logical_and_for_binary_masks_and_keeps_other_fields():
    original = SEG((1, 1, 4, 3), (1.5, 1.5, 3.5, 2.5), np.ones((2, 3), np.float32), 0.7, "face", np.zeros((2, 3, 3)))
    segs = SEGS((4, 5), [original])
    full = np.zeros((4, 5), np.float32)
    full[1:3, 2:4] = 1
    [seg] = segs_bitwise_and_mask(segs, full).segs
    assert np.array_equal(seg.cropped_mask, np.array([[0, 1, 1], [0, 1, 1]], np.float32))
    assert (seg.crop_region, seg.bbox, seg.confidence, seg.label) == ((1, 1, 4, 3), (1.5, 1.5, 3.5, 2.5), 0.7, "face")
    assert seg.cropped_image is original.cropped_image
    assert np.array_equal(original.cropped_mask, np.ones((2, 3)))  # input untouched


def test_and_mask_keeps_segs_whose_intersection_is_empty():
    segs = SEGS((4, 5), [seg_at((0, 0, 2, 2), np.ones((2, 2)))])
    result = segs_bitwise_and_mask(segs, np.zeros((4, 5), np.float32))
    assert len(result.segs) == 1 and not result.segs[0].cropped_mask.any()


def test_and_mask_rejects_a_mask_of_another_shape():
    with pytest.raises(ValueError):
        segs_bitwise_and_mask(SEGS((4, 5), []), np.zeros((5, 4), np.float32))
