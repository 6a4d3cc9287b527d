"""ComfyUI workflow import, on workflow files written for these tests in both formats."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from facedetailer.params import FaceDetailerParams
from facedetailer.workflow import WorkflowError, import_workflow

WORKFLOWS = Path(__file__).parent / "workflows"

# The values set on the FaceDetailer node of facedetailer_api.json and facedetailer_ui.json.
EXPECTED = {
    "guide_size": 512,
    "guide_size_for": False,
    "max_size": 768,
    "seed": 123456789012345678,  # above 2**53: must survive exactly
    "steps": 12,
    "cfg": 6.5,
    "sampler_name": "dpmpp_2m",
    "scheduler": "karras",
    "denoise": 0.35,
    "feather": 8,
    "noise_mask": True,
    "force_inpaint": False,
    "bbox_threshold": 0.4,
    "bbox_dilation": 4,
    "bbox_crop_factor": 2.5,
    "sam_detection_hint": "center-1",
    "sam_dilation": 2,
    "sam_threshold": 0.9,
    "sam_bbox_expansion": 3,
    "sam_mask_hint_threshold": 0.6,
    "sam_mask_hint_use_negative": "Small",
    "drop_size": 20,
    "wildcard": "[ASC] smiling [SEP] laughing",
    "cycle": 2,
    "inpaint_model": False,
    "noise_mask_feather": 15,
    "positive": "a detailed face, sharp eyes",
    "negative": "blurry, lowres",
    "use_sam": True,  # sam_model_opt is connected
}


def load(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


@pytest.mark.parametrize(("name", "form"), [("facedetailer_api.json", "api"), ("facedetailer_ui.json", "ui")])
def test_both_formats_give_the_node_values(name, form):
    imported = import_workflow(load(name))
    assert imported.format == form and imported.node_id == "8"
    assert imported.params == EXPECTED
    params = FaceDetailerParams.model_validate(imported.params)
    assert params.seed == 123456789012345678 and params.steps == 12
    assert imported.models["bbox_detector"].class_type == "UltralyticsDetectorProvider"
    assert imported.models["bbox_detector"].value == "bbox/face_yolov8m.pt"
    assert imported.models["model"].value == "sd15.safetensors"


def test_ui_format_skips_control_after_generate_and_follows_reroutes():
    workflow = load("facedetailer_ui.json")
    [face] = [node for node in workflow["nodes"] if node["type"] == "FaceDetailer"]
    assert face["widgets_values"][3:6] == [123456789012345678, "randomize", 12]
    positive_link = next(slot["link"] for slot in face["inputs"] if slot["name"] == "positive")
    origin = next(link[1] for link in workflow["links"] if link[0] == positive_link)
    assert next(node["type"] for node in workflow["nodes"] if node["id"] == origin) == "Reroute"
    imported = import_workflow(json.dumps(workflow))  # a JSON string is accepted too
    assert imported.params["steps"] == 12 and imported.params["cfg"] == 6.5
    assert imported.params["positive"] == "a detailed face, sharp eyes"


def test_without_the_seed_control_the_values_do_not_shift():
    workflow = load("facedetailer_ui.json")
    face = next(node for node in workflow["nodes"] if node["type"] == "FaceDetailer")
    del face["widgets_values"][4]
    assert import_workflow(workflow).params == EXPECTED


def test_api_format_inside_a_prompt_request_body():
    assert import_workflow({"prompt": load("facedetailer_api.json")}).params == EXPECTED


def test_several_facedetailer_nodes_need_workflow_node():
    workflow = load("two_facedetailers_ui.json")
    with pytest.raises(WorkflowError, match=r"2 FaceDetailer nodes .*8.*10 \('Second pass'\)") as error:
        import_workflow(workflow)
    assert error.value.field == "workflow_node"
    second = import_workflow(workflow, node=10)
    assert second.node_title == "Second pass"
    assert (second.params["seed"], second.params["steps"], second.params["denoise"]) == (7, 30, 0.2)
    assert "positive" not in second.params and "use_sam" not in second.params  # nothing linked
    assert import_workflow(workflow, node="8").params == EXPECTED
    with pytest.raises(WorkflowError, match="no FaceDetailer node with id 99") as missing:
        import_workflow(workflow, node=99)
    assert missing.value.field == "workflow_node"


def test_older_layout_and_a_seed_from_a_primitive_node():
    imported = import_workflow(load("old_layout_primitive_seed_ui.json"))
    assert imported.params["seed"] == 987654321, "the primitive's value, not the stale widget value"
    assert imported.params["wildcard"] == "[ASC] smiling [SEP] laughing"
    for later in ("cycle", "inpaint_model", "noise_mask_feather"):
        assert later not in imported.params  # the service's defaults apply, as ComfyUI would load them
    assert FaceDetailerParams.model_validate(imported.params).cycle == 1


def _face(workflow: dict) -> dict:
    return next(node for node in workflow["nodes"] if node["type"] == "FaceDetailer")


def test_positive_from_another_node_type_is_refused_by_name():
    workflow = load("facedetailer_ui.json")
    next(node for node in workflow["nodes"] if node["id"] == 2)["type"] = "ConditioningCombine"
    with pytest.raises(WorkflowError, match="ConditioningCombine") as error:
        import_workflow(workflow)
    assert error.value.field == "positive"
    api = load("facedetailer_api.json")
    api["3"]["class_type"] = "CLIPTextEncodeSDXL"
    with pytest.raises(WorkflowError, match="CLIPTextEncodeSDXL") as error:
        import_workflow(api)
    assert error.value.field == "negative"


def test_flux_guidance_and_the_negative_placeholder_are_imported():
    """A Flux detailer workflow: positive through FluxGuidance (→ guidance), Impact's Negative Cond
    Placeholder as the negative (→ negative: null, basic guidance)."""
    api = load("facedetailer_api.json")
    api["20"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 30.0}}
    api["21"] = {"class_type": "ImpactNegativeConditioningPlaceholder", "inputs": {}}
    api["8"]["inputs"].update(positive=["20", 0], negative=["21", 0])
    imported = import_workflow(api).params
    assert (imported["positive"], imported["guidance"], imported["negative"]) == (EXPECTED["positive"], 30.0, None)
    params = FaceDetailerParams.model_validate(imported)
    assert params.guidance == 30.0 and params.negative is None

    ui = load("facedetailer_ui.json")  # Reroute 7 → FluxGuidance 20 → FaceDetailer; placeholder 21 → negative
    ui["nodes"] += [
        {"id": 20, "type": "FluxGuidance", "inputs": [{"name": "conditioning", "type": "CONDITIONING", "link": 8}],
         "widgets_values": [2.5]},
        {"id": 21, "type": "ImpactNegativeConditioningPlaceholder", "inputs": [], "widgets_values": []},
    ]  # fmt: skip
    ui["links"] += [[13, 20, 0, 8, 4, "CONDITIONING"], [14, 21, 0, 8, 5, "CONDITIONING"]]
    face = _face(ui)
    for slot in face["inputs"]:
        slot["link"] = {"positive": 13, "negative": 14}.get(slot["name"], slot["link"])
    imported = import_workflow(ui).params
    assert (imported["positive"], imported["guidance"], imported["negative"]) == (EXPECTED["positive"], 2.5, None)
    # the placeholder is a negative only; FluxGuidance on the negative is not read as the request's guidance
    api["8"]["inputs"].update(positive=["21", 0], negative=["20", 0])
    with pytest.raises(WorkflowError, match="ImpactNegativeConditioningPlaceholder") as error:
        import_workflow(api)
    assert error.value.field == "positive"


def test_values_this_service_cannot_honour_are_refused():
    api = load("facedetailer_api.json")
    api["8"]["inputs"]["tiled_encode"] = True
    with pytest.raises(WorkflowError, match="tiled_encode"):
        import_workflow(api)
    hooked = load("facedetailer_api.json")
    hooked["8"]["inputs"]["detailer_hook"] = ["1", 0]
    with pytest.raises(WorkflowError, match="hook nodes cannot be imported yet") as error:
        import_workflow(hooked)
    assert error.value.field == "detailer_hook"


def test_unknown_widget_layouts_and_bad_documents_are_refused():
    workflow = load("facedetailer_ui.json")
    _face(workflow)["widgets_values"].append(1)
    with pytest.raises(WorkflowError, match="29 widget values"):
        import_workflow(workflow)
    shifted = load("facedetailer_ui.json")
    del _face(shifted)["widgets_values"][0]  # everything one place earlier: a layout we do not know
    with pytest.raises(WorkflowError):
        import_workflow(shifted)
    with pytest.raises(WorkflowError, match="not valid JSON"):
        import_workflow("{nope")
    with pytest.raises(WorkflowError, match="no FaceDetailer node"):
        import_workflow({"1": {"class_type": "KSampler", "inputs": {}}})
    with pytest.raises(WorkflowError, match="neither"):
        import_workflow({"hello": "world"})


def test_linked_value_nodes_in_api_format():
    api = copy.deepcopy(load("facedetailer_api.json"))
    api["20"] = {"class_type": "PrimitiveInt", "inputs": {"value": 42}}
    api["8"]["inputs"]["seed"] = ["20", 0]
    assert import_workflow(api).params["seed"] == 42
    api["21"] = {"class_type": "SomeMath", "inputs": {"a": 1, "b": 2}}
    api["8"]["inputs"]["steps"] = ["21", 0]
    with pytest.raises(WorkflowError, match="steps: comes from node 21") as error:
        import_workflow(api)
    assert error.value.field == "steps"
