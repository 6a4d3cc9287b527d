"""Property-based checks of the invariants the pipeline relies on (hypothesis, small budgets)."""

import random

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from facedetailer.blend import feather_mask, paste
from facedetailer.sam_prompts import combine_sam_masks
from facedetailer.segs import Detection, detections_to_segs, dilate_mask, make_crop_region
from facedetailer.wildcards import expand_text, plan_wildcards

FAST = settings(max_examples=60, deadline=None)


@st.composite
def image_and_box(draw):
    """An image size and a float bbox inside it, more than 1 px on each side (as drop_size >= 1 keeps).

    (``x1 + 1`` as a lower bound is not enough: ``(x1 + 1) - x1`` may come out below 1 in floats,
    and a box side below 1 px can give an empty crop region, which detection never produces.)
    """
    width = draw(st.integers(2, 2000))
    height = draw(st.integers(2, 2000))
    x1 = draw(st.floats(0, width - 1, allow_nan=False))
    y1 = draw(st.floats(0, height - 1, allow_nan=False))
    x2 = draw(st.floats(x1 + 1, width, allow_nan=False))
    y2 = draw(st.floats(y1 + 1, height, allow_nan=False))
    assume(x2 - x1 > 1 and y2 - y1 > 1)
    return width, height, (x1, y1, x2, y2)


@FAST
@given(image_and_box(), st.floats(1.0, 10.0))
def test_crop_region_is_inside_the_image_and_holds_the_box(sized_box, crop_factor):
    width, height, (x1, y1, x2, y2) = sized_box
    cx1, cy1, cx2, cy2 = make_crop_region(width, height, (x1, y1, x2, y2), crop_factor)
    assert 0 <= cx1 < cx2 <= width and 0 <= cy1 < cy2 <= height
    assert all(isinstance(v, int) for v in (cx1, cy1, cx2, cy2))
    # where the scaled box fits, the region holds the bbox, up to the reference's truncations: the
    # start is truncated, then the end int(start + size) again, so the end may lose up to 2 px; the
    # start is computed in floats as the reference does (x1 + w/2 - w·f/2), so with f = 1 and x1 a
    # hair below an integer it may round up to that integer (x1 = 8.999999999999998 starts at 9)
    if (x2 - x1) * crop_factor <= width:
        assert cx1 <= x1 + 1e-9 and cx2 > x2 - 2
    else:
        assert (cx1, cx2) == (0, width)
    if (y2 - y1) * crop_factor <= height:
        assert cy1 <= y1 + 1e-9 and cy2 > y2 - 2
    else:
        assert (cy1, cy2) == (0, height)


@FAST
@given(
    st.integers(12, 80),
    st.integers(12, 80),
    st.data(),
    st.integers(-15, 15),
    st.floats(1.0, 4.0),
    st.booleans(),
)
def test_windowed_dilation_equals_dilating_the_full_image_mask(height, width, data, dilation, factor, soft):
    x1 = data.draw(st.floats(0, width - 3))
    y1 = data.draw(st.floats(0, height - 3))
    x2 = data.draw(st.floats(x1 + 2, width))
    y2 = data.draw(st.floats(y1 + 2, height))
    if soft:
        full = np.random.default_rng(int(x1 * 7 + y1)).random((height, width)).astype(np.float32)
        detection = Detection("person", (x1, y1, x2, y2), 0.5, mask=full)
    else:
        full = np.zeros((height, width), np.float32)
        full[int(y1) : int(y2) + 1, int(x1) : int(x2) + 1] = 1
        detection = Detection("face", (x1, y1, x2, y2), 0.5)
    image = np.zeros((height, width, 3), np.uint8)
    [seg] = detections_to_segs(image, [detection], dilation=dilation, crop_factor=factor, drop_size=1).segs
    cx1, cy1, cx2, cy2 = seg.crop_region
    assert np.array_equal(seg.cropped_mask, dilate_mask(full, dilation)[cy1:cy2, cx1:cx2])


@st.composite
def image_crop_refined(draw, dtype):
    height = draw(st.integers(1, 24))
    width = draw(st.integers(1, 24))
    x1 = draw(st.integers(0, width - 1))
    y1 = draw(st.integers(0, height - 1))
    x2 = draw(st.integers(x1 + 1, width))
    y2 = draw(st.integers(y1 + 1, height))
    if dtype == np.uint8:
        elements = st.integers(0, 255)
    else:
        elements = st.floats(-2, 2, width=32, allow_nan=False)
    image = draw(arrays(dtype, (height, width, 3), elements=elements))
    refined = draw(arrays(dtype, (y2 - y1, x2 - x1, 3), elements=elements))
    return image, refined, (x1, y1, x2, y2)


@FAST
@given(image_crop_refined(np.uint8))
def test_paste_with_a_zero_mask_is_bit_identical_uint8(case):
    image, refined, crop = case
    mask = np.zeros(refined.shape[:2], np.float32)
    out = paste(image, refined, mask, crop)
    assert out.dtype == image.dtype and np.array_equal(out, image)


@FAST
@given(image_crop_refined(np.float32))
def test_paste_with_a_zero_mask_is_bit_identical_float(case):
    image, refined, crop = case
    mask = np.zeros(refined.shape[:2], np.float32)
    out = paste(image, refined, mask, crop)
    assert out.dtype == image.dtype and out.tobytes() == image.tobytes()


@FAST
@given(
    st.lists(arrays(np.bool_, (6, 7)), min_size=0, max_size=5), st.randoms(use_true_random=False), st.integers(-3, 3)
)
def test_sam_union_is_commutative(masks, shuffler, dilation):
    shuffled = list(masks)
    shuffler.shuffle(shuffled)
    assert np.array_equal(combine_sam_masks(masks, (6, 7), dilation), combine_sam_masks(shuffled, (6, 7), dilation))


@FAST
@given(
    arrays(np.float32, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=st.floats(0, 1, width=32)),
    st.integers(0, 100),
)
def test_feather_stays_within_zero_and_one(mask, feather):
    out = feather_mask(mask, feather)
    assert out.shape == mask.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="{}|$-:_#ab12 \n\\", max_size=40), st.integers(0, 2**64 - 1))
def test_expansion_never_crashes_and_is_reproducible(text, seed):
    files = {"ab": ["a", "{b|1}"]}
    first = expand_text(text, random.Random(seed), files)
    assert first == expand_text(text, random.Random(seed), files)


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="[]ASCDEPRNLBKOT:1{}|ab ", max_size=40), st.integers(0, 2**64 - 1))
def test_plans_are_reproducible_and_cover_every_face(wildcard, seed):
    from facedetailer.segs import SEG

    segs = [
        SEG((0, 0, 2, 2), (float(k % 3), float(k), k + 5.0, k + 7.0), np.ones((2, 2), np.float32), 0.9, "face")
        for k in range(4)
    ]
    first = plan_wildcards(wildcard, segs, seed=seed)
    assert sorted(first.order) == [0, 1, 2, 3] and len(first.prompts) == 4
    assert first == plan_wildcards(wildcard, segs, seed=seed)
