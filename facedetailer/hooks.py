"""Detailer hooks as data: the node's ``detailer_hook`` input as a list of typed objects.

Each type is one of Impact Pack's hook providers, its fields the provider's inputs (reference §9;
Impact's ``hook_nodes.py``/``impact_pack.py`` providers and ``hooks.py``). A list combines its
hooks as nested ``DetailerHookCombine`` nodes do: at every hook point the first hook acts first
and the next one sees its result.

Hook points, in the order the reference calls them for one image:
1. ``post_crop_region`` (bbox detector, per box, after make_crop_region): ``coreml``;
2. ``post_detection`` (end of bbox detection, before SAM/segm): the three SEGS filters;
3. ``touch_scaled_size`` (after the guide-size decision, for a face that is sampled): ``coreml``;
4. per cycle ``cycle_latent``, ``pre_ksample`` and ``get_custom_noise`` (inside sampling):
   ``noise_injection``/``unsampler``, ``denoise_scheduler``, ``variation_noise``;
5. ``should_retry_patch`` (on the decoded crop): ``black_patch_retry``.
Points 1–3 are pure geometry and act here; points 4–5 live in the sampling loop, with their
arithmetic in :mod:`facedetailer.cycle_hooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from facedetailer import cycle_hooks
from facedetailer.segs import SEGS, Box, CropRegion
from facedetailer.segs_filters import (
    OrderedTarget,
    RangeTarget,
    segs_label_filter,
    segs_ordered_filter,
    segs_range_filter,
)

INDEX_MAX = 2**63 - 1  # the providers' sys.maxsize bound
SEED_MAX = 2**64 - 1
AREA_ALIASES = ("area(=w*h)",)  # the node's spelling of "area"

CoreMLMode = Literal["512x512", "768x768", "512x768", "768x512"]


class _Hook(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _AreaTarget(_Hook):
    @field_validator("target", mode="before", check_fields=False)
    @classmethod
    def _node_area_name(cls, value: Any) -> Any:
        """Accept the node's ``area(=w*h)`` for ``area``, so workflow values carry over."""
        return "area" if value in AREA_ALIASES else value


class SegsOrderedFilterHook(_AreaTarget):
    """Keep faces ``take_start … take_start + take_count − 1`` of the crop regions sorted by ``target``."""

    type: Literal["segs_ordered_filter"]
    target: OrderedTarget = "area"
    order: bool = Field(True, description="true = descending, false = ascending")
    take_start: int = Field(0, ge=0, le=INDEX_MAX)
    take_count: int = Field(1, ge=0, le=INDEX_MAX)


class SegsRangeFilterHook(_AreaTarget):
    """Keep faces whose crop-region value lies inside (or outside) [min_value, max_value]."""

    type: Literal["segs_range_filter"]
    target: RangeTarget = "area"
    mode: bool = Field(True, description="true = inside, false = outside")
    min_value: int = Field(0, ge=0, le=INDEX_MAX)
    max_value: int = Field(67108864, ge=0, le=INDEX_MAX)


class SegsLabelFilterHook(_Hook):
    """Keep faces whose label is listed (comma-separated, as the node; ``all`` keeps every face)."""

    type: Literal["segs_label_filter"]
    labels: str | list[str]


class DenoiseSchedulerHook(_Hook):
    """Denoise moves linearly from the request's ``denoise`` to ``target_denoise`` over the cycles."""

    type: Literal["denoise_scheduler"]
    schedule_for_cycle: Literal["simple"] = "simple"
    target_denoise: float = Field(0.3, ge=0.0, le=1.0)


class NoiseInjectionHook(_Hook):
    """Adds seeded noise to the latent before each cycle (from cycle 1, or from 0 with ``from_start``)."""

    type: Literal["noise_injection"]
    schedule_for_cycle: cycle_hooks.CycleSchedule = "skip_start"
    source: Literal["CPU", "GPU"] = "CPU"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    start_strength: float = Field(2.0, ge=0.0, le=200.0)
    end_strength: float = Field(1.0, ge=0.0, le=200.0)


class UnsamplerHook(_Hook):
    """Runs the sampler backwards a few steps before each cycle (re-noising the previous result)."""

    type: Literal["unsampler"]
    schedule_for_cycle: cycle_hooks.CycleSchedule = "skip_start"
    steps: int = Field(25, ge=1, le=10000)
    start_end_at_step: int = Field(21, ge=0, le=10000)
    end_end_at_step: int = Field(24, ge=0, le=10000)
    cfg: float = Field(1.0, ge=0.0, le=100.0)
    sampler_name: str = Field("euler", min_length=1)
    scheduler: str = Field("normal", min_length=1)
    normalize: Literal["disable", "enable"] = "disable"


class VariationNoiseHook(_Hook):
    """Mixes a second noise (``seed``) into each cycle's initial noise with ``strength``."""

    type: Literal["variation_noise"]
    seed: int = Field(0, ge=0, le=SEED_MAX)
    strength: float = Field(0.0, ge=0.0, le=1.0)


class CoreMLHook(_Hook):
    """Fixes the sampled size (e.g. 512×512) and crops each face's region to that aspect ratio."""

    type: Literal["coreml"]
    mode: CoreMLMode = "512x512"

    @property
    def size(self) -> tuple[int, int]:
        width, height = self.mode.split("x")
        return int(width), int(height)


class BlackPatchRetryHook(_Hook):
    """Samples a face again (seed + 1, + 2, …) while its decoded crop is a black patch.

    ``max_retries`` is the input of the node that runs this check (DetailerForEachAutoRetry):
    attempts in all; when every attempt is black the request fails, as the reference raises.
    """

    type: Literal["black_patch_retry"]
    mean_thresh: int = Field(10, ge=0, le=255)
    var_thresh: int = Field(5, ge=0, le=255)
    max_retries: int = Field(1, ge=1, le=10)


DetailerHook = Annotated[
    SegsOrderedFilterHook
    | SegsRangeFilterHook
    | SegsLabelFilterHook
    | DenoiseSchedulerHook
    | NoiseInjectionHook
    | UnsamplerHook
    | VariationNoiseHook
    | CoreMLHook
    | BlackPatchRetryHook,
    Field(discriminator="type"),
]

# Hooks the request accepts but the service cannot run yet: the pipeline answers "not supported
# yet" for them. Empty since the inpainter runs the sampling hooks (deployments.inpainter_hooks)
# and the pipeline the black-patch retry (serve_app.patch_retry).
SAMPLING_HOOK_TYPES: frozenset[str] = frozenset()


# --- coreml geometry ---------------------------------------------------------------------------


def coreml_crop_region(crop: CropRegion, bbox: Box, size: tuple[int, int], image_size: tuple[int, int]) -> CropRegion:
    """CoreMLHook.post_crop_region: cut the crop region to the target aspect ratio.

    The side that is too long loses ``delta = crop − crop_other·ratio`` pixels, moved by the
    reference's ``gap_ratio = near_gap / far_gap`` (the bbox's distance to the crop's top/left
    edge over its distance to the bottom/right edge): start = int(start + delta·gap_ratio),
    end = int(start + target). Where the reference cannot compute this — the face touches the
    far edge (gap 0: a ZeroDivisionError there) or overhangs it by float truncation (a negative
    gap) — the window is put flush with that far edge (gap_ratio 1). Like the reference's array
    slicing, the result is then clipped to the image; a region that leaves the image entirely is
    empty and its face is skipped as "empty mask", as in the reference.
    """
    x1, y1, x2, y2 = crop
    bx1, by1, bx2, by2 = bbox
    target_w, target_h = size
    image_w, image_h = image_size
    crop_w, crop_h = x2 - x1, y2 - y1
    if crop_w <= 0 or crop_h <= 0:
        return crop
    target_ratio = target_w / target_h
    crop_ratio = crop_w / crop_h
    if crop_ratio < target_ratio:  # too tall: shrink the height
        new_h = crop_w / target_ratio
        start = int(y1 + (crop_h - new_h) * _gap_ratio(by1 - y1, y2 - by2))
        region = (x1, start, x2, int(start + new_h))
    elif crop_ratio > target_ratio:  # too wide: shrink the width
        new_w = target_ratio * crop_h
        start = int(x1 + (crop_w - new_w) * _gap_ratio(bx1 - x1, x2 - bx2))
        region = (start, y1, int(start + new_w), y2)
    else:
        return crop
    return _clip_region(region, image_w, image_h)


def _gap_ratio(near_gap: float, far_gap: float) -> float:
    return near_gap / far_gap if far_gap > 0 else 1.0


def _clip_region(region: tuple[int, int, int, int], width: int, height: int) -> CropRegion:
    x1, y1, x2, y2 = region
    cx1, cx2 = min(max(x1, 0), width), min(max(x2, 0), width)
    cy1, cy2 = min(max(y1, 0), height), min(max(y2, 0), height)
    return cx1, cy1, max(cx2, cx1), max(cy2, cy1)


# --- the combined hook -------------------------------------------------------------------------


@dataclass(frozen=True)
class CycleSettings:
    """The sampling values ``pre_ksample`` may change for one cycle."""

    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float


@dataclass(frozen=True)
class DetailerHooks:
    """A request's hooks, combined in list order (nested DetailerHookCombine)."""

    hooks: tuple[Any, ...] = ()

    @classmethod
    def of(cls, hooks: Sequence[Any] | None) -> DetailerHooks:
        return cls(tuple(hooks or ()))

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def _each(self, kind: type) -> list[Any]:
        return [hook for hook in self.hooks if isinstance(hook, kind)]

    @property
    def types(self) -> list[str]:
        return [hook.type for hook in self.hooks]

    def unwired(self) -> list[tuple[int, str]]:
        """(position, type) of every hook the service cannot run yet (``SAMPLING_HOOK_TYPES``)."""
        return [(index, hook.type) for index, hook in enumerate(self.hooks) if hook.type in SAMPLING_HOOK_TYPES]

    @property
    def allows_segm_override(self) -> bool:
        """The reference replaces the bbox SEGS by the segm SEGS only with no hook or a lone CoreML hook.

        (It tests the hook object for an ``override_bbox_by_segm`` attribute, which only
        CoreMLHook has; a combined hook has none.)
        """
        return not self.hooks or (len(self.hooks) == 1 and isinstance(self.hooks[0], CoreMLHook))

    # -- before sampling (pure geometry) --

    def post_crop_region(self, width: int, height: int, bbox: Box, crop: CropRegion) -> CropRegion:
        for hook in self._each(CoreMLHook):
            crop = coreml_crop_region(crop, bbox, hook.size, (width, height))
        return crop

    def post_detection(self, segs: SEGS) -> SEGS:
        for hook in self.hooks:
            if isinstance(hook, SegsOrderedFilterHook):
                segs = segs_ordered_filter(segs, hook.target, hook.order, hook.take_start, hook.take_count)
            elif isinstance(hook, SegsRangeFilterHook):
                segs = segs_range_filter(segs, hook.target, hook.mode, hook.min_value, hook.max_value)
            elif isinstance(hook, SegsLabelFilterHook):
                segs = segs_label_filter(segs, hook.labels)
        return segs

    def touch_scaled_size(self, width: int, height: int) -> tuple[int, int]:
        for hook in self._each(CoreMLHook):
            width, height = hook.size
        return width, height

    # -- inside sampling (the arithmetic; the inpainter's cycle loop does the tensor work) --

    def pre_ksample(self, settings: CycleSettings, cycle_index: int, cycle: int) -> CycleSettings:
        """The cycle's settings after every ``pre_ksample`` (denoise schedules), in list order."""
        for hook in self._each(DenoiseSchedulerHook):
            denoise = cycle_hooks.scheduled_denoise(settings.denoise, hook.target_denoise, cycle_index, cycle)
            settings = replace(settings, denoise=denoise)
        return settings

    def cycle_latent_steps(
        self, cycle_index: int, cycle: int
    ) -> list[cycle_hooks.NoiseInjectionStep | cycle_hooks.UnsampleStep]:
        """What ``cycle_latent`` does to the latent before cycle c, in list order."""
        steps: list[cycle_hooks.NoiseInjectionStep | cycle_hooks.UnsampleStep] = []
        for hook in self.hooks:
            step: cycle_hooks.NoiseInjectionStep | cycle_hooks.UnsampleStep | None = None
            if isinstance(hook, NoiseInjectionHook):
                step = cycle_hooks.noise_injection_step(
                    hook.schedule_for_cycle,
                    hook.seed,
                    hook.start_strength,
                    hook.end_strength,
                    hook.source,
                    cycle_index,
                    cycle,
                )
            elif isinstance(hook, UnsamplerHook):
                step = cycle_hooks.unsampler_step(
                    hook.schedule_for_cycle,
                    hook.steps,
                    hook.start_end_at_step,
                    hook.end_end_at_step,
                    hook.cfg,
                    hook.sampler_name,
                    hook.scheduler,
                    hook.normalize == "enable",
                    cycle_index,
                    cycle,
                )
            if step is not None:
                steps.append(step)
        return steps

    def custom_noise(self, seed: int, make_noise: Callable[[int], Any]) -> Any | None:
        """The cycle's initial noise, or None for the sampler's own ``randn(seed)``.

        ``make_noise(s)`` must give the noise the sampler would draw for seed ``s`` (ComfyUI's
        CPU ``randn`` with the latent's shape). Several variation hooks chain: each mixes its
        noise into the previous result. (The reference's DetailerHookCombine drops the
        sub-hooks' noise and returns its zero input instead; a lone hook, the case that
        works there, gives the same noise here.)
        """
        noise = None
        for hook in self._each(VariationNoiseHook):
            base = make_noise(seed) if noise is None else noise
            noise = cycle_hooks.mix_variation_noise(base, make_noise(hook.seed), hook.strength)
        return noise

    def should_retry_patch(self, patch: np.ndarray) -> bool:
        """True when any black-patch hook finds the decoded crop black (hooks OR-ed)."""
        return any(
            cycle_hooks.should_retry_patch(patch, hook.mean_thresh, hook.var_thresh)
            for hook in self._each(BlackPatchRetryHook)
        )

    @property
    def max_retries(self) -> int:
        """Attempts per face: the largest ``max_retries`` of the black-patch hooks (1 without one)."""
        return max((hook.max_retries for hook in self._each(BlackPatchRetryHook)), default=1)
