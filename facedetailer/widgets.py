"""FaceDetailer's inputs as widgets: one definition for the web form, the ComfyUI node and workflow import.

Names, types, defaults and ranges come from :class:`~facedetailer.params.FaceDetailerParams`;
this module adds only what a user interface needs on top: the node's grouping of its inputs
(the blank lines in Impact Pack's ``FaceDetailer.INPUT_TYPES``), increments, boolean labels,
combo options, and the order of the node's ``widgets_values`` in a saved ComfyUI workflow.

``python -m facedetailer.widgets FILE`` writes :func:`widget_specs` as JSON; the ComfyUI node
pack in ``clients/comfyui/`` ships that file (a test checks it is up to date).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from facedetailer.controlnet import ControlNetParams
from facedetailer.hooks import DetailerHook
from facedetailer.params import FaceDetailerParams

# ComfyUI's KSampler names (comfy/samplers.py, 2025 releases). A workflow may carry any of them;
# the service's inpainter runs the subset it maps faithfully and rejects the rest by name.
COMFYUI_SAMPLERS: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
)
# ComfyUI's schedulers followed by the ones Impact Pack adds for FaceDetailer.
COMFYUI_SCHEDULERS: tuple[str, ...] = (
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
    "kl_optimal", "AYS SDXL", "AYS SD1", "AYS SVD", "GITS[coeff=1.2]",
)

# The node's groups, in its order: (key, title, inputs). The form, the ComfyUI node and
# widget_specs() list the inputs in this order; the service's stand-ins for the node's model
# inputs (bbox_detector, sam_model, use_sam, …) sit where those inputs are.
GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "detailing",
        "Detailing",
        (
            "guide_size", "guide_size_for", "max_size", "seed", "steps", "cfg", "sampler_name", "scheduler",
            "positive", "negative", "denoise", "feather", "noise_mask", "force_inpaint",
        ),
    ),
    ("bbox", "BBox detector", ("bbox_threshold", "bbox_dilation", "bbox_crop_factor")),
    (
        "sam",
        "SAM",
        (
            "sam_detection_hint", "sam_dilation", "sam_threshold", "sam_bbox_expansion", "sam_mask_hint_threshold",
            "sam_mask_hint_use_negative",
        ),
    ),
    ("drop", "Detection size", ("drop_size",)),
    ("wildcard", "Detector and wildcard", ("bbox_detector", "wildcard")),
    ("cycle", "Cycle", ("cycle",)),
    (
        "optional",
        "Optional inputs",
        (
            "use_sam", "sam_model", "use_segm", "segm_detector", "override_bbox_by_segm", "detailer_hooks",
            "inpaint_model", "noise_mask_feather", "model", "guidance", "controlnet",
        ),
    ),
    # Not the node's: the service's seam options (off by default = the reference's paste).
    ("seams", "Seams (service options)", ("color_match", "color_match_strength", "blend")),
)
SERVICE_GROUP = ("service", "Service options")  # a field added to the params but not placed above

# The node's ``widgets_values`` order in a saved (UI format) workflow; ComfyUI inserts the seed's
# ``control_after_generate`` value right after ``seed``. Older Impact Pack releases end earlier
# (without cycle, inpaint_model, noise_mask_feather); V8 appends tiled_encode and tiled_decode.
NODE_WIDGETS: tuple[str, ...] = (
    "guide_size", "guide_size_for", "max_size", "seed", "steps", "cfg", "sampler_name", "scheduler", "denoise",
    "feather", "noise_mask", "force_inpaint", "bbox_threshold", "bbox_dilation", "bbox_crop_factor",
    "sam_detection_hint", "sam_dilation", "sam_threshold", "sam_bbox_expansion", "sam_mask_hint_threshold",
    "sam_mask_hint_use_negative", "drop_size", "wildcard", "cycle", "inpaint_model", "noise_mask_feather",
    "tiled_encode", "tiled_decode",
)
SEED_CONTROL = "control_after_generate"
SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# Widgets of V8 that this service cannot honour when switched on (their default is False).
UNSUPPORTED_NODE_WIDGETS = ("tiled_encode", "tiled_decode")
# The node's optional section, and the service's own options, which the node shows as optional
# too (everything else is required).
OPTIONAL = frozenset(name for key, _, members in GROUPS if key in ("optional", "seams") for name in members)
# Inputs naming one of the service's configured models (``None``: its first); their options are
# the names ``GET /v1/info`` lists (detectors, segm_detectors, sam_models, checkpoints).
MODEL_NAME_FIELDS = ("bbox_detector", "segm_detector", "sam_model", "model")

STEPS: dict[str, float] = {
    "guide_size": 8, "max_size": 8, "denoise": 0.01, "cfg": 0.1, "bbox_threshold": 0.01, "bbox_crop_factor": 0.1,
    "sam_threshold": 0.01, "sam_mask_hint_threshold": 0.01, "color_match_strength": 0.05, "guidance": 0.1,
}
BOOLEAN_LABELS: dict[str, tuple[str, str]] = {
    "guide_size_for": ("bbox", "crop_region"),
    "noise_mask": ("enabled", "disabled"),
    "force_inpaint": ("enabled", "disabled"),
    "inpaint_model": ("enabled", "disabled"),
    # fields of detailer hooks (facedetailer/hooks.py)
    "order": ("descending", "ascending"),
    "mode": ("inside", "outside"),
}
# What a form shows for a combo's values, where the value itself says little.
OPTION_LABELS: dict[str, dict[str, str]] = {
    "sam_mask_hint_use_negative": {"False": "off", "Small": "small", "Outter": "outer (the node's “Outter”)"},
}
MULTILINE = frozenset({"positive", "negative", "wildcard"})
DESCRIPTIONS: dict[str, str] = {
    "guide_size": "target size of the smaller side of the bbox (or crop region) when it is upscaled",
    "guide_size_for": "what guide_size measures: the detected bbox or the whole crop region",
    "max_size": "cap on the larger side of the upscaled crop",
    "seed": "base seed; face i of image k uses seed + k + i",
    "steps": "denoising steps actually run (ComfyUI semantics)",
    "cfg": "classifier-free guidance scale",
    "sampler_name": "ComfyUI sampler name",
    "scheduler": "ComfyUI scheduler name",
    "positive": "prompt for the refined faces (BREAK splits chunks; (word:1.2) emphasis as in ComfyUI)",
    "negative": "negative prompt (JSON null: none at all, basic guidance; needs cfg 1)",
    "denoise": "img2img strength: how much of each face is redrawn",
    "feather": "blur radius of the paste mask",
    "noise_mask": "denoise only inside the face mask",
    "force_inpaint": "refine faces even when no upscale is needed",
    "bbox_threshold": "detector confidence threshold",
    "bbox_dilation": "grow (+) or shrink (−) each detection's mask, pixels",
    "bbox_crop_factor": "crop region = bbox scaled by this about its centre",
    "sam_detection_hint": "how SAM is prompted",
    "sam_dilation": "grow or shrink the SAM mask, pixels",
    "sam_threshold": "keep SAM masks scoring at least this",
    "sam_bbox_expansion": "pixels added around the box given to SAM",
    "sam_mask_hint_threshold": "mask value above which a mask-area sample is a positive point",
    "sam_mask_hint_use_negative": "negative point prompts",
    "drop_size": "ignore detections whose width or height is at most this",
    "wildcard": "per-face prompts ([ASC], [SEP], {a|b}, __file__, <lora:…>)",
    "cycle": "refinement passes per face",
    "inpaint_model": "the checkpoint is an inpainting model",
    "noise_mask_feather": "soft noise mask (differential diffusion); 0 = off",
    "use_sam": "refine the masks with SAM (the node's sam_model_opt)",
    "use_segm": "AND the masks of the segm detector (the node's segm_detector_opt)",
    "override_bbox_by_segm": "use the segm detector's regions instead of the bbox detector's",
    "bbox_detector": "which of the service's bbox detectors (empty: its first)",
    "segm_detector": "which of the service's segm detectors (switches use_segm on)",
    "sam_model": "which of the service's SAM models (switches use_sam on)",
    "detailer_hooks": "the node's detailer_hook: typed hooks applied in list order (JSON text over HTTP; "
    "see docs/detailer-hooks.md)",
    "model": "which of the service's checkpoints (empty: its first)",
    "guidance": "FluxGuidance: the guidance a Flux.1 dev/Fill checkpoint is given (others ignore it)",
    "controlnet": "ControlNetApplyAdvanced per face with one of the service's ControlNets "
    "(JSON over HTTP: {name, strength, start_percent, end_percent})",
    "color_match": "match the refined face's colours to the original (Lab); none = the reference",
    "color_match_strength": "how far color_match moves the refined face",
    "blend": "feather = the reference's paste; multiband = Laplacian-pyramid blending",
}


# Friendly labels for forms (the node's name is shown beside them).
LABELS: dict[str, str] = {
    "guide_size": "Guide size", "guide_size_for": "Guide size measures", "max_size": "Max size", "seed": "Seed",
    "steps": "Steps", "cfg": "CFG scale", "sampler_name": "Sampler", "scheduler": "Scheduler",
    "positive": "Prompt", "negative": "Negative prompt", "denoise": "Denoise", "feather": "Paste feather",
    "noise_mask": "Noise mask", "force_inpaint": "Force inpaint", "bbox_threshold": "Detection threshold",
    "bbox_dilation": "Mask dilation", "bbox_crop_factor": "Crop factor", "sam_detection_hint": "SAM prompt",
    "sam_dilation": "SAM dilation", "sam_threshold": "SAM threshold", "sam_bbox_expansion": "SAM box expansion",
    "sam_mask_hint_threshold": "SAM mask-hint threshold", "sam_mask_hint_use_negative": "SAM negative points",
    "drop_size": "Ignore faces up to", "bbox_detector": "Face detector", "wildcard": "Per-face prompts",
    "cycle": "Cycles", "use_sam": "Refine masks with SAM", "sam_model": "SAM model",
    "use_segm": "Use segm detector", "segm_detector": "Segm detector",
    "override_bbox_by_segm": "Segm regions replace boxes", "detailer_hooks": "Detailer hooks",
    "inpaint_model": "Inpainting checkpoint", "noise_mask_feather": "Soft noise mask", "model": "Checkpoint",
    "controlnet": "ControlNet", "color_match": "Colour match", "color_match_strength": "Colour match strength",
    "blend": "Blend mode",
    # the fields of a hook or of controlnet
    "strength": "Strength", "start_percent": "Start", "end_percent": "End", "control_image": "Control image",
    "name": "Name", "target": "Target", "order": "Order", "take_start": "First", "take_count": "Count",
    "mode": "Keep", "min_value": "Min", "max_value": "Max", "labels": "Labels",
    "schedule_for_cycle": "Schedule", "target_denoise": "Last cycle's denoise", "source": "Noise source",
    "start_strength": "Start strength", "end_strength": "End strength", "start_end_at_step": "First end step",
    "end_end_at_step": "Last end step", "normalize": "Normalize", "mean_thresh": "Mean threshold",
    "var_thresh": "Variance threshold", "max_retries": "Attempts",
}  # fmt: skip
# Groups a form folds away under "advanced": rarely changed.
ADVANCED_GROUPS = frozenset({"sam", "drop", "optional", "seams"})
# Nested string fields that carry an image (base64): a form offers a file input.
IMAGE_FIELDS = frozenset({"control_image"})


def _kind(annotation: Any) -> tuple[str, list[Any] | None]:
    """The widget type of a field annotation (ComfyUI's names, and JSON for a list), and combo options."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is Literal:
        return "COMBO", list(get_args(annotation))
    if get_origin(annotation) is list or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "JSON", None
    kinds = {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}
    if annotation not in kinds:
        raise TypeError(f"no widget type for {annotation!r}")
    return kinds[annotation], None


def _group_of(name: str) -> tuple[str, str]:
    for key, title, members in GROUPS:
        if name in members:
            return key, title
    return SERVICE_GROUP


def _ordered_fields() -> list[str]:
    """Every parameter, in the groups' order; a field no group lists comes last."""
    placed = [name for _, _, members in GROUPS for name in members if name in FaceDetailerParams.model_fields]
    return placed + [name for name in FaceDetailerParams.model_fields if name not in placed]


def widget_specs(
    samplers: list[str] | tuple[str, ...] = COMFYUI_SAMPLERS,
    schedulers: list[str] | tuple[str, ...] = COMFYUI_SCHEDULERS,
    model_names: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """Every parameter as a widget, in the node's order, JSON-serialisable.

    ``samplers``/``schedulers`` are the combo options of ``sampler_name``/``scheduler`` (the
    service passes the names its inpainter supports; the ComfyUI node ComfyUI's own).
    ``model_names`` makes ``bbox_detector``/``segm_detector``/``sam_model`` combos of the
    service's configured names; without it they are free text.
    """
    specs = []
    for name in _ordered_fields():
        info = FaceDetailerParams.model_fields[name]
        kind, options = _kind(info.annotation)
        if name == "sampler_name":
            kind, options = "COMBO", list(samplers)
        elif name == "scheduler":
            kind, options = "COMBO", list(schedulers)
        elif name in MODEL_NAME_FIELDS and model_names is not None:
            kind, options = "COMBO", list(model_names.get(name, []))
        group, group_title = _group_of(name)
        spec: dict[str, Any] = {
            "name": name,
            "type": kind,
            "default": info.get_default(call_default_factory=True),
            "group": group,
            "group_title": group_title,
            "optional": name in OPTIONAL,
            "node_widget": name in NODE_WIDGETS,
            "description": DESCRIPTIONS.get(name, info.description or ""),
            "label": LABELS.get(name, name),
            "advanced": group in ADVANCED_GROUPS,
        }
        spec.update(_field_details(name, info, kind, options))
        if name == "detailer_hooks":
            spec["item_types"] = hook_types()
        elif name == "controlnet":
            spec["fields"] = model_fields(ControlNetParams)
        specs.append(spec)
    return specs


def _field_details(name: str, info: Any, kind: str, options: list[Any] | None) -> dict[str, Any]:
    """Bounds, increment, options, boolean labels of one field (top-level or nested)."""
    spec: dict[str, Any] = {}
    for item in info.metadata:
        if getattr(item, "ge", None) is not None:
            spec["min"] = item.ge
        if getattr(item, "le", None) is not None:
            spec["max"] = item.le
    if kind == "FLOAT":
        spec["step"] = STEPS.get(name, 0.01)
    elif kind == "INT":
        spec["step"] = 1
    if options is not None:
        spec["options"] = options
        if name in OPTION_LABELS:
            spec["option_labels"] = OPTION_LABELS[name]
    if name in BOOLEAN_LABELS:
        spec["label_on"], spec["label_off"] = BOOLEAN_LABELS[name]
    if kind == "STRING":
        spec["multiline"] = name in MULTILINE
        if name in IMAGE_FIELDS:
            spec["format"] = "image"
    if info.get_default(call_default_factory=True) is None:
        spec["nullable"] = True  # empty means "not given": the service decides
    return spec


def model_fields(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The fields of a nested input (a hook, ``controlnet``) as widgets: name, type, default, bounds."""
    fields = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        kind, options = _kind(info.annotation)
        default = info.get_default(call_default_factory=True)
        field = {
            "name": name,
            "type": kind,
            "default": None if default is PydanticUndefined else default,
            "required": info.is_required(),
            "label": LABELS.get(name, name),
            "description": info.description or "",
        }
        field.update(_field_details(name, info, kind, options))
        fields.append(field)
    return fields


def hook_types() -> list[dict[str, Any]]:
    """Every detailer hook type with its fields, in the union's order (for a structured editor)."""
    union = get_args(get_args(DetailerHook)[0])
    types_ = []
    for model in union:
        hook_type = get_args(model.model_fields["type"].annotation)[0]
        summary = " ".join((model.__doc__ or "").strip().split("\n\n")[0].replace("``", "").split())
        types_.append({"type": hook_type, "description": summary, "fields": model_fields(model, skip=("type",))})
    return types_


def specs_json(specs: list[dict[str, Any]] | None = None) -> str:
    """The committed JSON form of :func:`widget_specs` (stable formatting)."""
    return json.dumps(widget_specs() if specs is None else specs, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m facedetailer.widgets OUTPUT.json")
    Path(args[0]).write_text(specs_json(), encoding="utf-8")


if __name__ == "__main__":
    main()
