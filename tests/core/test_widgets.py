"""The widget definition agrees with FaceDetailerParams, the node's order and its groups."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from facedetailer.params import FaceDetailerParams
from facedetailer.widgets import GROUPS, NODE_WIDGETS, widget_specs

# Impact Pack's FaceDetailer.INPUT_TYPES value inputs in order (reference-notes §12), V8's tiled_* last.
NODE_ORDER = [
    "guide_size", "guide_size_for", "max_size", "seed", "steps", "cfg", "sampler_name", "scheduler", "denoise",
    "feather", "noise_mask", "force_inpaint", "bbox_threshold", "bbox_dilation", "bbox_crop_factor",
    "sam_detection_hint", "sam_dilation", "sam_threshold", "sam_bbox_expansion", "sam_mask_hint_threshold",
    "sam_mask_hint_use_negative", "drop_size", "wildcard", "cycle", "inpaint_model", "noise_mask_feather",
    "tiled_encode", "tiled_decode",
]  # fmt: skip


def test_every_parameter_once_in_the_node_order_with_its_default():
    specs = widget_specs()
    names = [spec["name"] for spec in specs]
    assert sorted(names) == sorted(FaceDetailerParams.model_fields) and len(set(names)) == len(names)
    defaults = FaceDetailerParams().model_dump()
    assert {spec["name"]: spec["default"] for spec in specs} == defaults
    assert list(NODE_WIDGETS) == NODE_ORDER
    widget_names = [spec["name"] for spec in specs if spec["node_widget"]]
    assert widget_names == [name for name in NODE_ORDER if name in FaceDetailerParams.model_fields]


def test_groups_follow_the_node_and_cover_every_field():
    flattened = [name for _, _, members in GROUPS for name in members]
    assert sorted(flattened) == sorted(FaceDetailerParams.model_fields), "every parameter has its group"
    assert [spec["name"] for spec in widget_specs()] == flattened, "widgets come in the groups' order"
    by_name = {spec["name"]: spec for spec in widget_specs()}
    assert by_name["bbox_dilation"]["group"] == "bbox" and by_name["sam_threshold"]["group"] == "sam"
    assert by_name["bbox_detector"]["group"] == by_name["wildcard"]["group"], "as in the node's INPUT_TYPES"
    assert by_name["noise_mask_feather"]["optional"] and not by_name["cycle"]["optional"]
    # the service's own seam options: a group of their own after the node's, optional, not node widgets
    assert [key for key, _, _ in GROUPS][-2:] == ["optional", "seams"]
    seams = [spec for spec in widget_specs() if spec["group"] == "seams"]
    assert [spec["name"] for spec in seams] == ["color_match", "color_match_strength", "blend"]
    assert all(spec["optional"] and not spec["node_widget"] for spec in seams)
    assert by_name["color_match"]["options"] == ["none", "mean_std", "histogram"]
    assert by_name["blend"]["default"] == "feather" and by_name["color_match"]["default"] == "none"


def test_model_names_and_hooks():
    by_name = {spec["name"]: spec for spec in widget_specs()}
    assert by_name["bbox_detector"]["type"] == "STRING" and by_name["bbox_detector"]["nullable"]
    assert by_name["detailer_hooks"]["type"] == "JSON" and by_name["detailer_hooks"]["default"] == []
    served = {spec["name"]: spec for spec in widget_specs(model_names={"bbox_detector": ["face", "hand"]})}
    assert served["bbox_detector"]["type"] == "COMBO" and served["bbox_detector"]["options"] == ["face", "hand"]
    assert served["sam_model"]["options"] == []


@pytest.mark.parametrize("spec", [s for s in widget_specs() if "min" in s or "max" in s], ids=lambda s: s["name"])
def test_ranges_are_the_ones_the_params_enforce(spec):
    name, epsilon = spec["name"], 1 if spec["type"] == "INT" else 1e-6
    for bound in ("min", "max"):
        if bound not in spec:
            continue
        FaceDetailerParams.model_validate({name: spec[bound]})  # the bound itself is allowed
        outside = spec[bound] - epsilon if bound == "min" else spec[bound] + epsilon
        with pytest.raises(ValidationError, match=name):
            FaceDetailerParams.model_validate({name: outside})


def test_types_options_and_labels():
    by_name = {spec["name"]: spec for spec in widget_specs(samplers=["euler"], schedulers=["normal", "karras"])}
    assert by_name["guide_size"]["type"] == "FLOAT" and by_name["guide_size"]["step"] == 8
    assert by_name["seed"]["type"] == "INT" and by_name["seed"]["max"] == 2**64 - 1
    assert by_name["sampler_name"]["options"] == ["euler"]
    assert by_name["scheduler"]["options"] == ["normal", "karras"]
    assert by_name["sam_mask_hint_use_negative"]["options"] == ["False", "Small", "Outter"]
    assert (by_name["guide_size_for"]["label_on"], by_name["guide_size_for"]["label_off"]) == ("bbox", "crop_region")
    assert by_name["wildcard"]["multiline"] and by_name["positive"]["multiline"]
    full = {spec["name"]: spec for spec in widget_specs()}
    assert {"euler", "dpmpp_2m", "uni_pc"} <= set(full["sampler_name"]["options"])
    assert full["sampler_name"]["default"] in full["sampler_name"]["options"]
    assert full["scheduler"]["default"] in full["scheduler"]["options"]


def test_labels_and_advanced_groups_for_forms():
    specs = widget_specs()
    assert all(spec["label"] for spec in specs)
    by_name = {spec["name"]: spec for spec in specs}
    assert by_name["cfg"]["label"] == "CFG scale" and by_name["steps"]["label"] == "Steps"
    assert not by_name["steps"]["advanced"] and by_name["sam_threshold"]["advanced"] and by_name["blend"]["advanced"]
    assert by_name["sam_mask_hint_use_negative"]["option_labels"]["False"] == "off"


def test_hook_types_and_controlnet_fields_describe_valid_inputs():
    """A structured editor builds hooks and a controlnet from these; their defaults are accepted."""
    by_name = {spec["name"]: spec for spec in widget_specs()}
    types = by_name["detailer_hooks"]["item_types"]
    assert [item["type"] for item in types][:3] == ["segs_ordered_filter", "segs_range_filter", "segs_label_filter"]
    hooks = []
    for item in types:
        hook = {"type": item["type"]}
        for field in item["fields"]:
            hook[field["name"]] = field["default"] if not field["required"] else "face"  # labels: a string
        hooks.append(hook)
    assert len(FaceDetailerParams(detailer_hooks=hooks).detailer_hooks) == len(types)
    unsampler = next(item for item in types if item["type"] == "unsampler")
    steps = next(field for field in unsampler["fields"] if field["name"] == "steps")
    assert (steps["type"], steps["min"], steps["max"], steps["default"]) == ("INT", 1, 10000, 25)
    fields = {field["name"]: field for field in by_name["controlnet"]["fields"]}
    assert fields["name"]["required"] and fields["control_image"]["format"] == "image"
    assert (fields["strength"]["min"], fields["strength"]["max"]) == (0.0, 10.0)
    controlnet = {name: field["default"] for name, field in fields.items()}
    FaceDetailerParams(controlnet={**controlnet, "name": "tile"})
