"""FaceDetailer's value inputs, with the node's defaults and ranges (spec §1, reference §12).

Out-of-range and unknown inputs are rejected by pydantic; its messages name the field and
the bound it broke (e.g. ``guide_size: Input should be less than or equal to 16384``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from facedetailer.blend import BlendMode
from facedetailer.color_match import ColorMatchMethod
from facedetailer.controlnet import ControlNetParams
from facedetailer.hooks import DetailerHook
from facedetailer.json_bounds import loads_bounded

MAX_RESOLUTION = 16384  # ComfyUI's MAX_RESOLUTION, the upper bound of every size input
MAX_DETAILER_HOOKS = 32  # hooks act at every cycle of every face: a bound on the list (real chains have a few)

SamDetectionHint = Literal[
    "center-1",
    "horizontal-2",
    "vertical-2",
    "rect-4",
    "diamond-4",
    "mask-area",
    "mask-points",
    "mask-point-bbox",
    "none",
]
SamNegativeMode = Literal["False", "Small", "Outter"]  # "Outter" is the node's spelling


class FaceDetailerParams(BaseModel):
    """Every FaceDetailer input that is a value (models are chosen elsewhere), plus service switches."""

    model_config = ConfigDict(extra="forbid")

    guide_size: float = Field(384.0, ge=64, le=MAX_RESOLUTION)  # Decision 6: 384, not 512
    guide_size_for: bool = True  # True = "bbox", False = "crop_region"
    max_size: float = Field(1024.0, ge=64, le=MAX_RESOLUTION)
    seed: int = Field(0, ge=0, le=2**64 - 1)
    steps: int = Field(20, ge=1, le=10000)
    cfg: float = Field(8.0, ge=0.0, le=100.0)
    sampler_name: str = Field("euler", min_length=1)  # the inpainter validates the name
    scheduler: str = Field("normal", min_length=1)  # the inpainter validates the name
    positive: str = ""
    # None (JSON null): no negative conditioning at all, Impact's Negative Cond Placeholder — the sampler runs the
    # positive alone (basic guidance), which needs cfg 1 (Flux's default way of sampling)
    negative: str | None = ""
    denoise: float = Field(0.5, ge=0.0001, le=1.0)
    feather: int = Field(5, ge=0, le=100)
    # Seam options (not the node's; off by default, which is the reference's paste bit for bit).
    color_match: ColorMatchMethod = Field(
        "none",
        description="Match the refined face's colours to the original crop in Lab over the face mask and a "
        "ring around it: 'mean_std' (per-channel mean and deviation) or 'histogram'; 'none' = the reference.",
    )
    color_match_strength: float = Field(
        1.0, ge=0.0, le=1.0, description="0 … 1: how far color_match moves the refined face (Lab interpolation)."
    )
    blend: BlendMode = Field(
        "feather",
        description="'feather' = the reference's paste through the feathered mask; 'multiband' = Laplacian-pyramid "
        "blending under that mask (colour and brightness blend over a wider band than detail).",
    )
    noise_mask: bool = True
    force_inpaint: bool = True
    bbox_threshold: float = Field(0.5, ge=0.0, le=1.0)
    bbox_dilation: int = Field(10, ge=-512, le=512)
    bbox_crop_factor: float = Field(3.0, ge=1.0, le=10.0)
    sam_detection_hint: SamDetectionHint = "center-1"
    sam_dilation: int = Field(0, ge=-512, le=512)
    sam_threshold: float = Field(0.93, ge=0.0, le=1.0)
    sam_bbox_expansion: int = Field(0, ge=0, le=1000)
    sam_mask_hint_threshold: float = Field(0.7, ge=0.0, le=1.0)
    sam_mask_hint_use_negative: SamNegativeMode = "False"
    drop_size: int = Field(10, ge=1, le=MAX_RESOLUTION)
    wildcard: str = ""
    cycle: int = Field(1, ge=1, le=10)
    inpaint_model: bool = False
    noise_mask_feather: int = Field(20, ge=0, le=100)
    # Service switches standing in for the node's optional model inputs.
    use_sam: bool = False  # sam_model_opt connected
    use_segm: bool = False  # segm_detector_opt connected
    override_bbox_by_segm: bool = False  # segm SEGS replace the bbox SEGS (reference §4.6)
    # The node's detailer_hook: typed hooks combined in list order (facedetailer/hooks.py).
    detailer_hooks: list[DetailerHook] = Field(default_factory=list, max_length=MAX_DETAILER_HOOKS)
    # The node's model inputs by name, among the models the service configures (None = the first).
    # Naming a segm detector or a SAM model also switches it on (use_segm / use_sam).
    bbox_detector: str | None = Field(None, min_length=1)
    segm_detector: str | None = Field(None, min_length=1)
    sam_model: str | None = Field(None, min_length=1)
    # The node's model input: a checkpoint the inpainter serves (GET /v1/info "checkpoints"; None = the first).
    model: str | None = Field(None, min_length=1)
    # ComfyUI's FluxGuidance on the conditioning: what a guidance-distilled model (Flux.1 dev, Fill) is given;
    # models without a guidance embedding ignore it, as ComfyUI does (docs/models.md).
    guidance: float = Field(3.5, ge=0.0, le=100.0)
    # ControlNetApplyAdvanced per face with a ControlNet the service configures (facedetailer/controlnet.py).
    controlnet: ControlNetParams | None = None

    @field_validator("sam_mask_hint_use_negative", mode="before")
    @classmethod
    def _accept_bool_false(cls, value: Any) -> Any:
        """ComfyUI workflows may carry the combo's "False" as a JSON boolean."""
        if value is False:
            return "False"
        return value

    @field_validator("controlnet", mode="before")
    @classmethod
    def _controlnet_as_json_text(cls, value: Any) -> Any:
        """A form field or CLI ``--param`` carries the object as JSON text."""
        if isinstance(value, str):
            try:
                return loads_bounded(value, "controlnet")
            except ValueError as error:
                raise ValueError(f"not a JSON object: {error}") from error
        return value

    @field_validator("detailer_hooks", mode="before")
    @classmethod
    def _hooks_as_json_text(cls, value: Any) -> Any:
        """A form field or CLI ``--param`` carries the list as JSON text."""
        if isinstance(value, str):
            try:
                return loads_bounded(value, "detailer_hooks")
            except ValueError as error:
                raise ValueError(f"not a JSON list of hooks: {error}") from error
        return value

    @model_validator(mode="after")
    def _named_model_switches_it_on(self) -> FaceDetailerParams:
        for name_field, switch in (("sam_model", "use_sam"), ("segm_detector", "use_segm")):
            if getattr(self, name_field) is None:
                continue
            if switch in self.model_fields_set and not getattr(self, switch):
                raise ValueError(f"{name_field} names a model but {switch} is false; drop one of them")
            setattr(self, switch, True)
        return self

    @classmethod
    def field_ranges(cls) -> dict[str, str]:
        """Human-readable allowed range of every bounded field, e.g. ``{"cycle": "1 … 10"}``."""
        ranges: dict[str, str] = {}
        for name, info in cls.model_fields.items():
            low = high = None
            for item in info.metadata:
                low = getattr(item, "ge", low)
                high = getattr(item, "le", high)
            if low is not None or high is not None:
                ranges[name] = f"{low if low is not None else '-inf'} … {high if high is not None else 'inf'}"
        return ranges
