"""The ComfyUI node pack loads without ComfyUI and mirrors FaceDetailer's widgets from one definition.

Calls against a served app are in tests/serve/test_clients.py.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from facedetailer.params import FaceDetailerParams
from facedetailer.widgets import specs_json, widget_specs

PACK = Path(__file__).resolve().parents[2] / "clients" / "comfyui"


def load_pack(name: str = "facedetailer_ray_serve_pack"):
    """Import the folder the way ComfyUI imports a custom node folder (its __init__.py as a package)."""
    sys.modules.pop(name, None)
    sys.modules.pop(f"{name}.nodes", None)
    spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py", submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_the_shipped_widgets_file_is_generated_from_the_params():
    committed = (PACK / "widgets.json").read_text(encoding="utf-8")
    assert committed == specs_json(), "regenerate: python -m facedetailer.widgets clients/comfyui/widgets.json"


def test_imports_without_comfyui_and_registers_the_node():
    assert "comfy" not in sys.modules
    pack = load_pack()
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == {"FaceDetailerRayServe": "FaceDetailer (Ray Serve)"}
    node = pack.NODE_CLASS_MAPPINGS["FaceDetailerRayServe"]
    assert node.RETURN_NAMES == ("image", "cropped_refined", "cropped_enhanced_alpha", "mask", "cnet_images")
    assert node.RETURN_TYPES == ("IMAGE", "IMAGE", "IMAGE", "MASK", "IMAGE")
    assert node.OUTPUT_IS_LIST == (False, True, True, False, True)
    assert "comfy" not in sys.modules


def test_widgets_have_the_params_names_defaults_and_ranges():
    inputs = load_pack().NODE_CLASS_MAPPINGS["FaceDetailerRayServe"].INPUT_TYPES()
    required, optional = inputs["required"], inputs["optional"]
    assert list(required)[:2] == ["image", "endpoint"] and required["image"] == ("IMAGE",)
    widgets = {**required, **optional}
    defaults = FaceDetailerParams().model_dump()
    assert set(widgets) - {"image", "endpoint"} == set(defaults)
    for name, info in FaceDetailerParams.model_fields.items():
        kind, options = widgets[name]
        if defaults[name] is None:  # a model name: empty means the service's default
            assert (kind, options["default"]) == ("STRING", ""), name
        elif name == "detailer_hooks":  # JSON text the service parses
            assert (kind, options["default"]) == ("STRING", "[]")
            FaceDetailerParams.model_validate({name: options["default"]})
        else:
            assert options["default"] == defaults[name], name
        bounds = {type(item).__name__: item for item in info.metadata}
        if "Ge" in bounds:
            assert options["min"] == bounds["Ge"].ge, name
        if "Le" in bounds:
            assert options["max"] == bounds["Le"].le, name
    assert widgets["seed"] == ("INT", widgets["seed"][1]) and widgets["seed"][1]["max"] == 0xFFFFFFFFFFFFFFFF
    assert widgets["guide_size_for"][1]["label_on"] == "bbox"
    assert widgets["sam_mask_hint_use_negative"][0] == ["False", "Small", "Outter"]
    assert widgets["wildcard"][1]["multiline"] is True
    # the node's order; its optional section holds the node's optional widgets
    names = [name for name in list(required) + list(optional) if name not in ("image", "endpoint")]
    assert names == [spec["name"] for spec in widget_specs()]
    assert {"inpaint_model", "noise_mask_feather"} <= set(optional)


def test_inside_comfyui_the_sampler_lists_are_comfyuis(monkeypatch):
    samplers = types.ModuleType("comfy.samplers")
    samplers.KSampler = types.SimpleNamespace(SAMPLERS=["euler", "my_sampler"], SCHEDULERS=["normal", "my_sched"])
    comfy = types.ModuleType("comfy")
    comfy.samplers = samplers
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.samplers", samplers)
    inputs = load_pack("facedetailer_ray_serve_in_comfy").NODE_CLASS_MAPPINGS["FaceDetailerRayServe"].INPUT_TYPES()
    assert inputs["required"]["sampler_name"][0] == ["euler", "my_sampler"]
    assert inputs["required"]["scheduler"][0][:2] == ["normal", "my_sched"]
    assert "AYS SDXL" in inputs["required"]["scheduler"][0], "Impact Pack's extra schedulers stay"


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_image_conversion_truncates_like_comfyui(value):
    import torch

    nodes = sys.modules[load_pack().__name__ + ".nodes"]
    frame = torch.full((2, 3, 3), value)
    assert int(nodes.to_uint8(frame)[0, 0, 0]) == int(value * 255)
