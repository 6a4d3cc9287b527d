"""The "FaceDetailer (Ray Serve)" node: FaceDetailer's value widgets, computed by a remote service.

Its widgets come from ``widgets.json``, generated from the service's own parameter definition
(``python -m facedetailer.widgets clients/comfyui/widgets.json``), so names, defaults and
ranges are FaceDetailer's. Inputs and outputs use ComfyUI's layouts: IMAGE ``[B, H, W, C]``
float in [0, 1], MASK ``[B, H, W]``; the crop lists are lists of ``[1, h, w, C]`` images.
A service's API key comes from ComfyUI's environment (``FACEDETAILER_API_KEY``), never from a
widget: widget values are saved in workflows and in every PNG's metadata.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

WIDGETS_FILE = Path(__file__).with_name("widgets.json")
WIDGETS: list[dict[str, Any]] = json.loads(WIDGETS_FILE.read_text(encoding="utf-8"))
DEFAULT_ENDPOINT = "http://127.0.0.1:8000"
PLACEHOLDER_SIZE = 64  # FaceDetailer's black stand-in for an empty image list


def _comfy_names(spec: dict[str, Any]) -> list[str]:
    """Inside ComfyUI, its own sampler/scheduler lists (as FaceDetailer shows them); else ours."""
    try:
        samplers = importlib.import_module("comfy.samplers")
    except ImportError:
        return list(spec["options"])
    if spec["name"] == "sampler_name":
        return list(samplers.KSampler.SAMPLERS)
    extra = [name for name in spec["options"] if name not in samplers.KSampler.SCHEDULERS]
    return list(samplers.KSampler.SCHEDULERS) + extra  # plus the schedulers Impact Pack adds


def widget_input(spec: dict[str, Any]) -> tuple[Any, ...]:
    """One ComfyUI input definition from a widget spec."""
    options: dict[str, Any] = {"default": spec["default"], "tooltip": spec.get("description", "")}
    kind = spec["type"]
    if kind in ("INT", "FLOAT"):
        options.update({key: spec[key] for key in ("min", "max", "step") if key in spec})
        return (kind, options)
    if kind == "BOOLEAN":
        if "label_on" in spec:
            options.update(label_on=spec["label_on"], label_off=spec["label_off"])
        return ("BOOLEAN", options)
    if kind == "STRING":
        options.update(multiline=spec.get("multiline", False), dynamicPrompts=False)
        if spec.get("nullable"):
            options["default"] = ""  # empty: the service's choice
        return ("STRING", options)
    if kind == "JSON":  # e.g. detailer_hooks: JSON text, parsed by the service
        default = "" if spec.get("nullable") else json.dumps(spec["default"])  # e.g. controlnet: empty = none
        options.update(default=default, multiline=True, dynamicPrompts=False)
        return ("STRING", options)
    if kind == "COMBO":
        names = _comfy_names(spec) if spec["name"] in ("sampler_name", "scheduler") else list(spec["options"])
        return (names, options)
    raise ValueError(f"widget {spec['name']}: unknown type {kind}")


def _client_package() -> Any:
    """``facedetailer_client``: installed, or from the facedetailer-serve checkout holding this folder."""
    try:
        return importlib.import_module("facedetailer_client")
    except ImportError:
        pass
    here = Path(__file__).resolve().parent  # resolves a symlink in custom_nodes/ to the checkout
    for root in (here, here.parent.parent):
        if (root / "facedetailer_client" / "__init__.py").is_file():
            sys.path.insert(0, str(root))
            return importlib.import_module("facedetailer_client")
    raise ImportError(
        "FaceDetailer (Ray Serve) needs the facedetailer_client package: link this folder from a "
        "facedetailer-serve checkout into custom_nodes/, or copy facedetailer_client/ next to nodes.py; "
        "and `pip install httpx` into ComfyUI's Python"
    )


def to_uint8(image: Any) -> Any:
    """One IMAGE [H, W, C] float in [0, 1] → uint8 RGB, truncating as ComfyUI's image saving does."""
    import numpy as np

    array = image.detach().cpu().float().numpy()
    return np.clip(array[..., :3] * 255.0, 0, 255).astype(np.uint8)


def from_png(data: bytes, mask: bool = False) -> Any:
    """PNG bytes → float tensor in [0, 1]: ``[h, w]`` for a mask, else ``[h, w, 3 or 4]`` as stored."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        mode = "L" if mask else "RGBA" if image.mode in ("RGBA", "LA") else "RGB"
        array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())


class FaceDetailerRayServe:
    """FaceDetailer's inputs and outputs; the detailing runs on a facedetailer-serve endpoint."""

    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("image", "cropped_refined", "cropped_enhanced_alpha", "mask", "cnet_images")
    OUTPUT_IS_LIST = (False, True, True, False, True)
    FUNCTION = "doit"
    CATEGORY = "ImpactPack/Simple"
    DESCRIPTION = "FaceDetailer computed by a facedetailer-serve service (Ray Serve) at the endpoint URL."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, Any]]:  # ComfyUI's name
        required: dict[str, Any] = {
            "image": ("IMAGE",),
            "endpoint": ("STRING", {"default": DEFAULT_ENDPOINT, "tooltip": "URL of the facedetailer-serve service"}),
        }
        optional: dict[str, Any] = {}
        for spec in WIDGETS:
            (optional if spec["optional"] else required)[spec["name"]] = widget_input(spec)
        return {"required": required, "optional": optional}

    def doit(self, image: Any, endpoint: str, **values: Any) -> tuple[Any, ...]:
        import torch

        client_package = _client_package()
        params = {
            spec["name"]: values[spec["name"]]
            for spec in WIDGETS
            if spec["name"] in values and not (spec.get("nullable") and values[spec["name"]] in ("", None))
        }
        frames = [to_uint8(frame) for frame in image]
        refined: list[Any] = []
        alpha: list[Any] = []
        cnet: list[Any] = []
        images: list[Any] = []
        masks: list[Any] = []
        # the API key, if any: $FACEDETAILER_API_KEY (read by the client)
        with client_package.FaceDetailerClient(endpoint.rstrip("/")) as client:
            chunk = int(client.info()["limits"]["max_batch_images"])
            for start in range(0, len(frames), chunk):
                # image k of the batch uses seed + k, in any chunking
                seed = (int(params.get("seed", 0)) + start) % 2**64
                result = client.detail(frames[start : start + chunk], {**params, "seed": seed})
                images += [from_png(png) for png in result.images]
                masks += [from_png(png, mask=True) for png in result.masks]
                # the node's lists: each image's items, or its black placeholder
                refined += [from_png(png)[None] for png in result.cropped_refined]
                alpha += [from_png(png)[None] for png in result.cropped_enhanced_alpha]
                cnet += [from_png(png)[None] for png in result.cnet_images]
        placeholder = torch.zeros((1, PLACEHOLDER_SIZE, PLACEHOLDER_SIZE, 3))  # for a service that sends none
        refined, alpha, cnet = refined or [placeholder], alpha or [placeholder], cnet or [placeholder]
        return torch.stack(images), refined, alpha, torch.stack(masks), cnet


NODE_CLASS_MAPPINGS = {"FaceDetailerRayServe": FaceDetailerRayServe}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceDetailerRayServe": "FaceDetailer (Ray Serve)"}
