"""Detailer hooks as data (spec §9, reference §9): parsing, SEGS filters, CoreML geometry, combination.

Expected values are worked out by hand from the reference's formulas (Impact's SEGS filter nodes
measure the crop region; CoreMLHook's gap-ratio arithmetic; DetailerHookCombine's order).
"""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from facedetailer.hooks import (
    SAMPLING_HOOK_TYPES,
    CoreMLHook,
    CycleSettings,
    DetailerHook,
    DetailerHooks,
    coreml_crop_region,
)
from facedetailer.params import FaceDetailerParams
from facedetailer.segs import SEG, SEGS, Detection, detections_to_segs

HOOKS = TypeAdapter(list[DetailerHook])


def parse(*hooks: dict) -> DetailerHooks:
    return DetailerHooks.of(HOOKS.validate_python(list(hooks)))


def segs_of(width: int, height: int, boxes: list[tuple[float, float, float, float]], **kwargs) -> SEGS:
    image = np.zeros((height, width, 3), np.uint8)
    detections = [Detection(f"face{i}", box, 0.9 - 0.1 * i) for i, box in enumerate(boxes)]
    return detections_to_segs(image, detections, dilation=0, crop_factor=3.0, drop_size=1, **kwargs)


def labels(segs: SEGS) -> list[str]:
    return [seg.label for seg in segs.segs]


# --- parsing --------------------------------------------------------------------------------------


def test_every_type_parses_with_the_providers_defaults():
    hooks = HOOKS.validate_python(
        [
            {"type": "segs_ordered_filter"},
            {"type": "segs_range_filter"},
            {"type": "segs_label_filter", "labels": "face"},
            {"type": "denoise_scheduler"},
            {"type": "noise_injection"},
            {"type": "unsampler"},
            {"type": "variation_noise"},
            {"type": "coreml"},
            {"type": "black_patch_retry"},
        ]
    )
    dumped = [hook.model_dump() for hook in hooks]
    assert dumped[0] == {
        "type": "segs_ordered_filter",
        "target": "area",
        "order": True,
        "take_start": 0,
        "take_count": 1,
    }
    assert dumped[1] == {
        "type": "segs_range_filter",
        "target": "area",
        "mode": True,
        "min_value": 0,
        "max_value": 67108864,
    }
    assert dumped[3] == {"type": "denoise_scheduler", "schedule_for_cycle": "simple", "target_denoise": 0.3}
    assert dumped[4] == {
        "type": "noise_injection",
        "schedule_for_cycle": "skip_start",
        "source": "CPU",
        "seed": 0,
        "start_strength": 2.0,
        "end_strength": 1.0,
    }
    assert dumped[5] | {} == {
        "type": "unsampler",
        "schedule_for_cycle": "skip_start",
        "steps": 25,
        "start_end_at_step": 21,
        "end_end_at_step": 24,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "normalize": "disable",
    }
    assert dumped[6] == {"type": "variation_noise", "seed": 0, "strength": 0.0}
    assert dumped[7] == {"type": "coreml", "mode": "512x512"}
    assert dumped[8] == {"type": "black_patch_retry", "mean_thresh": 10, "var_thresh": 5, "max_retries": 1}
    assert {hook.type for hook in hooks} == {
        "denoise_scheduler",
        "noise_injection",
        "unsampler",
        "variation_noise",
        "black_patch_retry",
        "segs_ordered_filter",
        "segs_range_filter",
        "segs_label_filter",
        "coreml",
    }


def test_the_nodes_area_spelling_is_accepted():
    [hook] = HOOKS.validate_python([{"type": "segs_range_filter", "target": "area(=w*h)"}])
    assert hook.target == "area"


@pytest.mark.parametrize(
    ("hooks", "needle"),
    [
        ([{"type": "face_swap"}], "face_swap"),
        ([{"type": "coreml", "bogus": 1}], "bogus"),
        ([{"type": "coreml", "mode": "640x640"}], "mode"),
        ([{"type": "segs_ordered_filter", "target": "confidence"}], "target"),
        ([{"type": "noise_injection", "start_strength": 201}], "start_strength"),
        ([{"type": "black_patch_retry", "mean_thresh": 256}], "mean_thresh"),
        ([{"target": "area"}], "type"),
    ],
)
def test_unknown_types_fields_and_values_are_errors_that_name_them(hooks, needle):
    with pytest.raises(ValidationError) as error:
        FaceDetailerParams(detailer_hooks=hooks)
    assert needle in str(error.value)


def test_hooks_may_come_as_json_text_from_a_form_field():
    params = FaceDetailerParams(detailer_hooks='[{"type": "coreml", "mode": "768x512"}]')
    assert params.detailer_hooks == [CoreMLHook(type="coreml", mode="768x512")]
    with pytest.raises(ValidationError, match="JSON"):
        FaceDetailerParams(detailer_hooks="[{not json")


# --- SEGS filters (post_detection) --------------------------------------------------------------------

THREE_SIZES = [(40, 40, 60, 60), (150, 150, 190, 190), (300, 40, 330, 70)]  # 20, 40 and 30 px faces


def test_ordered_filter_default_keeps_the_face_with_the_largest_crop():
    segs = segs_of(400, 400, THREE_SIZES)
    assert [seg.crop_region for seg in segs.segs] == [(20, 20, 80, 80), (110, 110, 230, 230), (270, 10, 360, 100)]
    assert labels(parse({"type": "segs_ordered_filter"}).post_detection(segs)) == ["face1"]


@pytest.mark.parametrize(
    ("hook", "kept"),
    [
        ({"order": False}, ["face0"]),
        ({"take_start": 1, "take_count": 2}, ["face2", "face0"]),
        ({"order": False, "take_start": 1, "take_count": 5}, ["face2", "face1"]),
        ({"take_count": 0}, []),
        ({"take_start": 3}, []),
        ({"target": "x1", "order": False, "take_count": 3}, ["face0", "face1", "face2"]),
        ({"target": "y2"}, ["face1"]),
        ({"target": "height", "order": False}, ["face0"]),
    ],
)
def test_ordered_filter_ranks_and_slices(hook, kept):
    segs = segs_of(400, 400, THREE_SIZES)
    assert labels(parse({"type": "segs_ordered_filter", **hook}).post_detection(segs)) == kept


def test_ordered_filter_measures_the_crop_region_not_the_bbox():
    # A 60×60 face's crop (180×180) is clamped to the 150-px-high image: 180×150 = 27000 px;
    # a 110×30 face (smaller bbox: 3300 < 3600 px) has the larger crop, 330×90 = 29700 px.
    segs = segs_of(1000, 150, [(100, 45, 160, 105), (500, 60, 610, 90)])
    assert [seg.crop_region for seg in segs.segs] == [(40, 0, 220, 150), (390, 30, 720, 120)]
    assert labels(parse({"type": "segs_ordered_filter"}).post_detection(segs)) == ["face1"]


def test_ordered_filter_sort_is_stable_both_ways():
    segs = segs_of(600, 200, [(50, 50, 80, 80), (250, 50, 280, 80), (450, 50, 480, 80)])
    assert labels(parse({"type": "segs_ordered_filter", "take_count": 3}).post_detection(segs)) == [
        "face0",
        "face1",
        "face2",
    ]
    assert labels(parse({"type": "segs_ordered_filter", "order": False}).post_detection(segs)) == ["face0"]


@pytest.mark.parametrize(
    ("hook", "kept"),
    [
        ({"min_value": 8100, "max_value": 14400}, ["face1", "face2"]),  # bounds inclusive
        ({"min_value": 8101, "max_value": 14399}, []),
        ({"mode": False, "min_value": 8100, "max_value": 14400}, ["face0"]),
        ({"target": "width", "min_value": 0, "max_value": 60}, ["face0"]),
        ({"target": "x1", "min_value": 100, "max_value": 300}, ["face1", "face2"]),
    ],
)
def test_range_filter(hook, kept):
    segs = segs_of(400, 400, THREE_SIZES)  # crop areas 3600, 14400, 8100
    assert labels(parse({"type": "segs_range_filter", **hook}).post_detection(segs)) == kept


def test_range_filter_length_percent_is_the_longer_over_the_shorter_side():
    segs = segs_of(1000, 150, [(100, 45, 160, 105), (500, 60, 610, 90)])  # crops 180×150 and 330×90
    inside = parse({"type": "segs_range_filter", "target": "length_percent", "min_value": 120, "max_value": 120})
    assert labels(inside.post_detection(segs)) == ["face0"]  # 180/150 = 120 %; 330/90 = 366.7 %
    outside = parse({"type": "segs_range_filter", "target": "length_percent", "mode": False, "max_value": 366})
    assert labels(outside.post_detection(segs)) == ["face1"]


def test_label_filter():
    segs = SEGS((100, 100), [_seg(label) for label in ("face", "hand", "left_eye", "right_eye", "Face")])
    assert labels(parse({"type": "segs_label_filter", "labels": "face, hand"}).post_detection(segs)) == [
        "face",
        "hand",
    ]
    assert labels(parse({"type": "segs_label_filter", "labels": "eyes"}).post_detection(segs)) == [
        "left_eye",
        "right_eye",
    ]
    assert len(parse({"type": "segs_label_filter", "labels": "hand,all"}).post_detection(segs).segs) == 5
    assert labels(parse({"type": "segs_label_filter", "labels": ["hand"]}).post_detection(segs)) == ["hand"]
    assert parse({"type": "segs_label_filter", "labels": ""}).post_detection(segs).segs == []


def _seg(label: str) -> SEG:
    return SEG((0, 0, 10, 10), (2, 2, 8, 8), np.ones((10, 10), np.float32), 0.9, label)


def test_filters_combine_in_list_order():
    segs = segs_of(400, 400, THREE_SIZES)
    largest_then_label = parse({"type": "segs_ordered_filter"}, {"type": "segs_label_filter", "labels": "face0,face2"})
    label_then_largest = parse({"type": "segs_label_filter", "labels": "face0,face2"}, {"type": "segs_ordered_filter"})
    assert labels(largest_then_label.post_detection(segs)) == []
    assert labels(label_then_largest.post_detection(segs)) == ["face2"]


# --- coreml (post_crop_region, touch_scaled_size) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("bbox", "mode", "region"),
    [
        # too wide for 512x768 (w/h 2/3): width 300 → 200; gaps 50 | 150 → x1 + 100·(50/150)
        ((150, 150, 250, 250), "512x768", (133, 50, 333, 350)),
        # too tall for 768x512: height 300 → 200; equal gaps (ratio 1) → the cut comes off the top
        ((150, 150, 250, 250), "768x512", (100, 150, 400, 350)),
        # top gap 200, bottom gap 50: y1 + 100·4 = 450 — the window leaves the face, as the reference's
        ((200, 250, 300, 300), "768x512", (100, 450, 400, 650)),
        # the face touches the bottom edge (the reference divides by zero): flush with that edge
        ((200, 100, 300, 350), "768x512", (100, 150, 400, 350)),
        # already the target ratio: unchanged
        ((150, 150, 250, 250), "512x512", (100, 50, 400, 350)),
    ],
)
def test_coreml_crop_region(bbox, mode, region):
    size = CoreMLHook(type="coreml", mode=mode).size
    assert coreml_crop_region((100, 50, 400, 350), bbox, size, (1000, 1000)) == region


def test_coreml_region_is_clipped_to_the_image_and_may_become_empty():
    assert coreml_crop_region((100, 50, 400, 350), (200, 250, 300, 300), (768, 512), (1000, 500)) == (
        100,
        450,
        400,
        500,
    )
    assert coreml_crop_region((100, 50, 400, 350), (200, 250, 300, 300), (768, 512), (1000, 380)) == (
        100,
        380,
        400,
        380,
    )


def test_coreml_in_detection_cuts_the_mask_to_the_new_region_and_fixes_the_sampled_size():
    hooks = parse({"type": "coreml", "mode": "512x512"})
    segs = segs_of(600, 600, [(280, 250, 320, 310)], post_crop_region=hooks.post_crop_region)
    [seg] = segs.segs
    # crop 120×180 (240..360 × 190..370) → square 120×120; gaps 60 | 60 → y1 + 60
    assert seg.crop_region == (240, 250, 360, 370)
    expected = np.zeros((120, 120), np.float32)
    expected[0:61, 40:81] = 1.0  # the box's inclusive pixel span 280..320 × 250..310, in crop coordinates
    np.testing.assert_array_equal(seg.cropped_mask, expected)
    assert hooks.touch_scaled_size(300, 451) == (512, 512)
    assert DetailerHooks().touch_scaled_size(300, 451) == (300, 451)


# --- combination ----------------------------------------------------------------------------------


def test_denoise_schedules_chain_in_list_order():
    hooks = parse({"type": "denoise_scheduler", "target_denoise": 0.2})
    base = CycleSettings(seed=5, steps=20, cfg=8.0, sampler_name="euler", scheduler="normal", denoise=0.6)
    assert [hooks.pre_ksample(base, c, 3).denoise for c in range(3)] == pytest.approx([0.6, 0.4, 0.2])
    assert hooks.pre_ksample(base, 0, 1).denoise == 0.6  # a single cycle: the hook does nothing
    both = parse(
        {"type": "denoise_scheduler", "target_denoise": 0.2}, {"type": "denoise_scheduler", "target_denoise": 1.0}
    )
    # cycle 1 of 3: the first gives 0.4, the second moves that half-way to 1.0
    assert both.pre_ksample(base, 1, 3).denoise == pytest.approx(0.7)
    assert both.pre_ksample(base, 1, 3).seed == 5


def test_cycle_latent_steps_in_list_order():
    hooks = parse(
        {"type": "unsampler", "schedule_for_cycle": "from_start"},
        {"type": "noise_injection", "seed": 7},
    )
    assert [type(step).__name__ for step in hooks.cycle_latent_steps(0, 2)] == ["UnsampleStep"]
    assert [type(step).__name__ for step in hooks.cycle_latent_steps(1, 2)] == ["UnsampleStep", "NoiseInjectionStep"]


def test_custom_noise_mixes_each_variation_hook_in_turn():
    draws: list[int] = []

    def make_noise(seed: int) -> np.ndarray:
        draws.append(seed)
        return np.full(4, float(seed))

    assert DetailerHooks().custom_noise(3, make_noise) is None
    lone = parse({"type": "variation_noise", "seed": 11, "strength": 0.5})
    np.testing.assert_allclose(lone.custom_noise(3, make_noise), (0.5 * 3 + 0.5 * 11) / np.sqrt(0.5))
    assert draws == [3, 11]
    chained = parse(
        {"type": "variation_noise", "seed": 11, "strength": 1.0},
        {"type": "variation_noise", "seed": 5, "strength": 1.0},
    )
    np.testing.assert_allclose(chained.custom_noise(3, make_noise), 5.0)


def test_should_retry_is_an_or_and_max_retries_the_largest():
    dark = np.zeros((8, 8, 3), np.uint8)
    strict = parse({"type": "black_patch_retry", "mean_thresh": 0, "var_thresh": 0})
    assert strict.should_retry_patch(dark) and not strict.should_retry_patch(dark + 1)
    either = parse(
        {"type": "black_patch_retry", "mean_thresh": 0, "var_thresh": 0, "max_retries": 3},
        {"type": "black_patch_retry", "mean_thresh": 2, "var_thresh": 0},
    )
    assert either.should_retry_patch(dark + 1) and not either.should_retry_patch(dark + 3)
    assert either.max_retries == 3 and DetailerHooks().max_retries == 1


def test_segm_override_is_allowed_only_without_hooks_or_with_a_lone_coreml_hook():
    assert DetailerHooks().allows_segm_override
    assert parse({"type": "coreml"}).allows_segm_override
    assert not parse({"type": "segs_ordered_filter"}).allows_segm_override
    assert not parse({"type": "coreml"}, {"type": "coreml"}).allows_segm_override


def test_every_hook_type_is_wired():
    hooks = parse(*({"type": name} for name in ("coreml", "denoise_scheduler", "noise_injection", "unsampler",
                                                 "variation_noise", "black_patch_retry")))  # fmt: skip
    assert SAMPLING_HOOK_TYPES == frozenset() and hooks.unwired() == []
