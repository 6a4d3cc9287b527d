"""FaceDetailerParams: the node's defaults and ranges (spec §1, reference §12)."""

import pytest
from pydantic import ValidationError

from facedetailer.params import FaceDetailerParams

SPEC_DEFAULTS = {
    "guide_size": 384.0,  # Decision 6
    "guide_size_for": True,
    "max_size": 1024.0,
    "seed": 0,
    "steps": 20,
    "cfg": 8.0,
    "sampler_name": "euler",
    "scheduler": "normal",
    "positive": "",
    "negative": "",
    "denoise": 0.5,
    "feather": 5,
    "color_match": "none",  # seam options, off = the reference's paste
    "color_match_strength": 1.0,
    "blend": "feather",
    "noise_mask": True,
    "force_inpaint": True,
    "bbox_threshold": 0.5,
    "bbox_dilation": 10,
    "bbox_crop_factor": 3.0,
    "sam_detection_hint": "center-1",
    "sam_dilation": 0,
    "sam_threshold": 0.93,
    "sam_bbox_expansion": 0,
    "sam_mask_hint_threshold": 0.7,
    "sam_mask_hint_use_negative": "False",
    "drop_size": 10,
    "wildcard": "",
    "cycle": 1,
    "inpaint_model": False,
    "noise_mask_feather": 20,
    "use_sam": False,
    "use_segm": False,
    "override_bbox_by_segm": False,
    "detailer_hooks": [],
    "bbox_detector": None,
    "segm_detector": None,
    "sam_model": None,
    "controlnet": None,
    "model": None,
    "guidance": 3.5,  # FluxGuidance's default (Decision 14)
}


def test_defaults_equal_the_spec_table():
    assert FaceDetailerParams().model_dump() == SPEC_DEFAULTS


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [
        ("guide_size", 63, "64"),
        ("guide_size", 16385, "16384"),
        ("max_size", 16392, "16384"),
        ("seed", -1, "0"),
        ("seed", 2**64, "18446744073709551615"),
        ("steps", 0, "1"),
        ("steps", 10001, "10000"),
        ("cfg", 100.5, "100"),
        ("guidance", -0.1, "0"),
        ("guidance", 100.5, "100"),
        ("denoise", 0.0, "0.0001"),
        ("denoise", 1.01, "1"),
        ("feather", 101, "100"),
        ("bbox_threshold", 1.5, "1"),
        ("bbox_dilation", -513, "-512"),
        ("bbox_crop_factor", 0.5, "1"),
        ("bbox_crop_factor", 10.5, "10"),
        ("sam_dilation", 513, "512"),
        ("sam_threshold", -0.1, "0"),
        ("sam_bbox_expansion", 1001, "1000"),
        ("sam_mask_hint_threshold", 2, "1"),
        ("drop_size", 0, "1"),
        ("cycle", 11, "10"),
        ("noise_mask_feather", -1, "0"),
    ],
)
def test_out_of_range_names_the_field_and_its_bound(field, value, bound):
    with pytest.raises(ValidationError) as caught:
        FaceDetailerParams(**{field: value})
    message = str(caught.value)
    assert field in message
    assert f"equal to {bound}" in message


def test_bounds_themselves_are_accepted():
    low = FaceDetailerParams(guide_size=64, seed=0, denoise=0.0001, drop_size=1, cycle=1, bbox_dilation=-512)
    high = FaceDetailerParams(guide_size=16384, seed=2**64 - 1, denoise=1.0, cycle=10, bbox_crop_factor=10)
    assert low.denoise == 0.0001 and high.seed == 2**64 - 1


def test_unknown_field_is_rejected():
    with pytest.raises(ValidationError) as caught:
        FaceDetailerParams(guide_sise=512)
    assert "guide_sise" in str(caught.value)
    assert "Extra inputs are not permitted" in str(caught.value)


def test_negative_mode_accepts_the_json_boolean_false():
    assert FaceDetailerParams(sam_mask_hint_use_negative=False).sam_mask_hint_use_negative == "False"
    assert FaceDetailerParams(sam_mask_hint_use_negative="Outter").sam_mask_hint_use_negative == "Outter"


@pytest.mark.parametrize("value", [True, "Outer", "small"])
def test_negative_mode_rejects_other_values(value):
    with pytest.raises(ValidationError) as caught:
        FaceDetailerParams(sam_mask_hint_use_negative=value)
    assert "sam_mask_hint_use_negative" in str(caught.value)


def test_detection_hint_lists_the_allowed_names():
    with pytest.raises(ValidationError) as caught:
        FaceDetailerParams(sam_detection_hint="center-2")
    assert "sam_detection_hint" in str(caught.value)
    assert "'mask-points'" in str(caught.value)


def test_sampler_and_scheduler_must_not_be_empty():
    with pytest.raises(ValidationError):
        FaceDetailerParams(sampler_name="")
    with pytest.raises(ValidationError):
        FaceDetailerParams(scheduler="")
    assert FaceDetailerParams(sampler_name="anything").sampler_name == "anything"  # the inpainter validates


def test_fractional_value_for_an_int_field_is_rejected():
    with pytest.raises(ValidationError):
        FaceDetailerParams(steps=20.5)


def test_field_ranges_reports_bounds():
    ranges = FaceDetailerParams.field_ranges()
    assert ranges["cycle"] == "1 … 10"
    assert ranges["bbox_dilation"] == "-512 … 512"
    assert "wildcard" not in ranges


def test_round_trip_through_json():
    params = FaceDetailerParams(seed=2**64 - 1, wildcard="[ASC]a[SEP]b", sam_mask_hint_use_negative="Small")
    assert FaceDetailerParams.model_validate_json(params.model_dump_json()) == params


def test_negative_may_be_null_for_basic_guidance():
    from facedetailer.prompts import face_conditioning
    from facedetailer.wildcards import FacePrompt

    params = FaceDetailerParams.model_validate({"negative": None, "cfg": 1.0})
    assert params.negative is None and FaceDetailerParams().negative == ""
    plain = FacePrompt(skip=False, stop=False, seed=None, text=None, concat=False)
    conditioning = face_conditioning("a face BREAK smiling <lora:detail:0.5>", None, plain)
    assert conditioning.negative is None and conditioning.positive == ("a face", "smiling")
    assert [lora.name for lora in conditioning.loras] == ["detail"]
    assert face_conditioning("a face", "", plain).negative == ("",), "empty is still a negative prompt"
