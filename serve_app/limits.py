"""Work limits: refuse a request that would hold the inpainter too long, before it does any work.

One request must not stall everyone else: ``steps=10000`` or ``guide_size=max_size=16384`` is a
valid FaceDetailer input, but on a shared service it burns a GPU for minutes. The operator sets
``limits`` in the config (listed by ``GET /v1/info``):

- ``max_steps``: the request's ``steps``, and each ``unsampler`` hook's ``steps`` (checked on
  arrival);
- ``max_sample_pixels``: the area (width × height) of each upscaled crop the inpainter samples;
- ``max_faces_per_image``: faces the inpainter would refine in one image;
- ``max_work_units``: the request's total sampling work, in **work units**: one unit is one UNet
  sampling step of one 512×512 crop. A face costs ``attempts × steps run × ControlNet factor ×
  (width × height) / 512²``, summed over every face of every image, where *steps run* counts
  every cycle's ``steps`` (a cycle whose scheduled denoise is 0 samples nothing) plus the steps
  each ``unsampler`` hook runs before a cycle, *attempts* is the largest ``max_retries`` of the
  ``black_patch_retry`` hooks (every retry samples the face again; 1 without one) and the
  ControlNet factor is 1.5 with an active ControlNet (it runs beside every UNet evaluation; its
  copy of the UNet's encoder and middle block costs 0.35–0.45 of a UNet evaluation). The UNet's cost
  grows with the latent area, so a 1024×1024 crop counts 4 units per step; 2nd-order samplers
  (heun, dpm_2) evaluate the UNet twice per step and are not weighted more. Noise injection and
  variation noise draw noise, no model call: they cost no units (the list of hooks is bounded);
- ``max_prompt_tokens``: the CLIP tokens one face's prompts give the UNet to attend to, counted as
  the text encoder reads them — in whole windows of 75 tokens (each ``BREAK`` chunk starts a new
  window), after wildcards and LoRA tags — with positive and negative repeated to a common length
  as every UNet evaluation sees them (``a BREAK b`` counts 150; a 2-window positive with a
  3-window negative counts 6 windows, 450). Counted with the checkpoint's own tokenizer;
- ``max_prompt_chars``: each of ``positive``, ``negative`` and ``wildcard`` in characters, checked
  on arrival before any tokenizer runs.

Steps, hook steps and prompt lengths are checked when a request arrives; faces, sample sizes and
per-face prompts (wildcards) are only known after detection and planning:
:func:`check_planned_work` runs then, before the first inpainter call. A request over a limit is
refused with 422 naming the limit, its value and the value asked.

The JSON a request carries is bounded too (``MAX_*`` below, :mod:`facedetailer.json_bounds`):
these are structural bounds no real request comes near, not settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from facedetailer.cycle_hooks import UnsampleStep
from facedetailer.hooks import CycleSettings, DetailerHooks, UnsamplerHook
from facedetailer.json_bounds import MAX_JSON_DEPTH, MAX_JSON_VALUES
from facedetailer.params import FaceDetailerParams
from facedetailer.safe_paths import check_name
from serve_app.config import Limits
from serve_app.pipeline import PlannedFace

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_JSON_VALUES",
    "MAX_WORKFLOW_BYTES",
    "LimitExceededError",
    "check_planned_work",
    "check_prompt_tokens",
    "check_request",
    "face_work_units",
    "max_params_chars",
]

WORK_UNIT_PIXELS = 512 * 512
WINDOW_TOKENS = 75  # ComfyUI's CLIP window: start token, 75 tokens, end token
# One ControlNet evaluation beside a UNet evaluation: 0.35–0.37 of the UNet's FLOPs for SD 1.5, 0.45 for
# SDXL (benchmarks/controlnet_flops.py); counted as 0.5, rounded up.
CONTROLNET_WORK = 0.5
MAX_WORKFLOW_BYTES = 5 * 1024 * 1024  # a ComfyUI workflow (saved UI workflows are tens to hundreds of KB)
PROMPT_FIELDS = ("positive", "negative", "wildcard")

# the inputs that lower what each limit counts: a 422's ``details`` name them as fields
LIMIT_FIELDS: dict[str, tuple[str, ...]] = {
    "max_steps": ("steps",),
    "max_sample_pixels": ("guide_size", "max_size"),
    "max_faces_per_image": ("bbox_threshold", "drop_size"),
    "max_work_units": ("steps", "cycle", "guide_size", "max_size"),
    "max_prompt_tokens": PROMPT_FIELDS,
    "max_prompt_chars": PROMPT_FIELDS,
    # videos (serve_app/video/limits.py)
    "max_video_seconds": ("video",),
    "max_video_frames": ("video",),
    "max_video_pixels": ("video",),
    "max_video_work_units": ("steps", "cycle", "guide_size", "max_size", "pick_tracks", "max_tracks"),
}


class LimitExceededError(ValueError):
    """A request over one of the configured work limits; ``fields`` overrides the limit's usual inputs."""

    def __init__(
        self,
        limit: str,
        limit_value: float,
        requested: float,
        message: str,
        fields: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.limit_value = limit_value
        self.requested = requested
        self.fields = fields if fields is not None else LIMIT_FIELDS[limit]

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.limit, self.limit_value, self.requested, str(self), self.fields))

    def details(self) -> list[dict[str, Any]]:
        """The service's error ``details`` shape — one ``{"field", "message"}`` per input that lowers
        what the limit counts — each with the limit, its value and the value asked."""
        facts = {"limit": f"limits.{self.limit}", "limit_value": self.limit_value, "requested": self.requested}
        return [{"field": field, "message": str(self), **facts} for field in self.fields]


def max_params_chars(limits: Limits) -> int:
    """Text characters a request's parameters may carry (without ``workflow`` and control image):
    the three prompt fields at their limit, and room for every other value."""
    return 3 * limits.max_prompt_chars + 1024 * 1024


# ---- work units --------------------------------------------------------------------------------


def face_sampling_steps(params: FaceDetailerParams) -> int:
    """UNet sampling steps one attempt at one face runs: each cycle's ``steps`` (none when the
    denoise schedule brings the cycle's denoise to 0) plus the steps of each unsampler run."""
    hooks = DetailerHooks.of(params.detailer_hooks)
    settings = CycleSettings(
        seed=0,
        steps=params.steps,
        cfg=params.cfg,
        sampler_name=params.sampler_name,
        scheduler=params.scheduler,
        denoise=params.denoise,
    )
    total = 0
    for cycle_index in range(params.cycle):
        for step in hooks.cycle_latent_steps(cycle_index, params.cycle):
            if isinstance(step, UnsampleStep):  # sigmas cut at last_step: that many steps, at most ``steps``
                total += min(step.last_step, step.steps)
        if hooks.pre_ksample(settings, cycle_index, params.cycle).denoise > 0.0:
            total += params.steps
    return total


def face_work_factor(params: FaceDetailerParams) -> float:
    """Work units of one face per 512×512 of crop: attempts × steps run × ControlNet factor."""
    attempts = DetailerHooks.of(params.detailer_hooks).max_retries  # black_patch_retry samples again
    control = params.controlnet is not None and params.controlnet.active
    return attempts * face_sampling_steps(params) * (1.0 + CONTROLNET_WORK if control else 1.0)


def limited_widgets(specs: list[dict[str, Any]], limits: Limits) -> list[dict[str, Any]]:
    """The form's widgets with this service's limits applied (``GET /v1/info`` ``parameters``).

    A bound the service enforces on the value itself replaces the node's (``steps``: at most
    ``limits.max_steps``; the node's bound stays as ``node_max``); limits only known after
    detection become a ``hint`` on the inputs that lower what they count.
    """
    side = int(limits.max_sample_pixels**0.5)
    hints = {
        "guide_size": f"this service samples at most {limits.max_sample_pixels} pixels per face "
        f"(limits.max_sample_pixels, about {side}×{side})",
        "max_size": f"this service samples at most {limits.max_sample_pixels} pixels per face "
        f"(limits.max_sample_pixels): a max_size above {side} can be refused for square crops",
        "cycle": f"steps × cycles × crop pixels / 512² over all faces may not exceed {limits.max_work_units:g} "
        "(limits.max_work_units)",
        "bbox_threshold": f"at most {limits.max_faces_per_image} faces per image are refined "
        "(limits.max_faces_per_image)",
    }
    limited = []
    for spec in specs:
        spec = dict(spec)
        name = spec["name"]
        if name == "steps" and spec.get("max", limits.max_steps + 1) > limits.max_steps:
            spec["node_max"], spec["max"], spec["limit"] = spec.get("max"), limits.max_steps, "limits.max_steps"
        if name in hints:
            spec["hint"] = hints[name]
        limited.append(spec)
    return limited


def face_work_units(params: FaceDetailerParams, sample_size: tuple[int, int]) -> float:
    """The work units of one face sampled at ``sample_size`` (width, height)."""
    width, height = sample_size
    return face_work_factor(params) * width * height / WORK_UNIT_PIXELS


def work_fields(params: FaceDetailerParams) -> tuple[str, ...]:
    """The inputs that lower this request's work units: the usual ones, hooks and ControlNet when they add."""
    fields = LIMIT_FIELDS["max_work_units"]
    if any(hook.type in ("unsampler", "black_patch_retry") for hook in params.detailer_hooks):
        fields += ("detailer_hooks",)
    if params.controlnet is not None and params.controlnet.active:
        fields += ("controlnet",)
    return fields


# ---- checks ------------------------------------------------------------------------------------


def planned_work_units(params: FaceDetailerParams, faces: Sequence[PlannedFace]) -> float:
    """The request's work units over every planned face (``max_work_units`` and the keys' hourly quotas)."""
    return sum(face_work_units(params, face.sample_size) for face in faces)


def check_request(params: FaceDetailerParams, limits: Limits) -> None:
    """What the parameters alone exceed (on arrival, before any model work)."""
    if params.steps > limits.max_steps:
        raise LimitExceededError(
            "max_steps",
            limits.max_steps,
            params.steps,
            f"steps: {params.steps} exceeds limits.max_steps = {limits.max_steps} on this service",
        )
    for index, hook in enumerate(params.detailer_hooks):
        if isinstance(hook, UnsamplerHook) and hook.steps > limits.max_steps:
            field = f"detailer_hooks.{index}.steps"
            raise LimitExceededError(
                "max_steps",
                limits.max_steps,
                hook.steps,
                f"{field}: the unsampler's {hook.steps} steps exceed limits.max_steps = {limits.max_steps} "
                "on this service",
                (field,),
            )
    for name in PROMPT_FIELDS:
        length = len(getattr(params, name) or "")  # negative: null has no text
        if length > limits.max_prompt_chars:
            raise LimitExceededError(
                "max_prompt_chars",
                limits.max_prompt_chars,
                length,
                f"{name}: {length} characters, over limits.max_prompt_chars = {limits.max_prompt_chars}",
                (name,),
            )


def check_prompt_tokens(field: str, windows: int, limits: Limits, fields: tuple[str, ...] | None = None) -> None:
    """One prompt text (``positive`` or ``negative`` as sent) alone within ``max_prompt_tokens``."""
    tokens = windows * WINDOW_TOKENS
    if tokens > limits.max_prompt_tokens:
        raise LimitExceededError(
            "max_prompt_tokens",
            limits.max_prompt_tokens,
            tokens,
            f"{field}: {windows} windows of {WINDOW_TOKENS} CLIP tokens ({tokens} tokens), over "
            f"limits.max_prompt_tokens = {limits.max_prompt_tokens}; shorten it or use fewer BREAKs",
            fields or (field,),
        )


def face_prompt_tokens(positive_windows: int, negative_windows: int) -> int:
    """The tokens a face's UNet evaluations attend to: both prompts repeated to a common length."""
    return math.lcm(positive_windows, negative_windows) * WINDOW_TOKENS


def check_planned_work(
    params: FaceDetailerParams,
    faces: Sequence[PlannedFace],
    limits: Limits,
    prompt_windows: Callable[[tuple[str, ...]], int] | None = None,
) -> None:
    """What the planned faces exceed (after detection, before the inpainter).

    ``prompt_windows(chunks)`` counts the CLIP windows of a prompt's chunks (the checkpoint's
    tokenizer); without it the prompt tokens are not checked here.
    """
    for face in faces:
        width, height = face.sample_size
        if width * height > limits.max_sample_pixels:
            raise LimitExceededError(
                "max_sample_pixels",
                limits.max_sample_pixels,
                width * height,
                f"image {face.image_index}, face {face.position}: the upscaled crop would be {width}×{height} = "
                f"{width * height} pixels, over limits.max_sample_pixels = {limits.max_sample_pixels}; "
                "lower guide_size or max_size",
            )
    per_image: dict[int, int] = {}
    for face in faces:
        per_image[face.image_index] = per_image.get(face.image_index, 0) + 1
    for image_index, count in sorted(per_image.items()):
        if count > limits.max_faces_per_image:
            raise LimitExceededError(
                "max_faces_per_image",
                limits.max_faces_per_image,
                count,
                f"image {image_index}: {count} faces to refine, over limits.max_faces_per_image = "
                f"{limits.max_faces_per_image}; raise bbox_threshold or drop_size, or [SKIP] faces in the wildcard",
            )
    if prompt_windows is not None:
        for face in faces:
            positive = prompt_windows(face.positive)
            # negative: null samples the positive alone (no negative row to repeat to a common length)
            negative = positive if face.negative is None else prompt_windows(face.negative)
            tokens = face_prompt_tokens(positive, negative)
            if tokens > limits.max_prompt_tokens:
                raise LimitExceededError(
                    "max_prompt_tokens",
                    limits.max_prompt_tokens,
                    tokens,
                    f"image {face.image_index}, face {face.position}: its prompts give the UNet {tokens} tokens to "
                    f"attend to ({positive} windows of {WINDOW_TOKENS} for positive, {negative} for negative, "
                    f"repeated to a common {tokens // WINDOW_TOKENS}), over limits.max_prompt_tokens = "
                    f"{limits.max_prompt_tokens}; shorten the prompts or the wildcard, or use fewer BREAKs",
                )
    total = planned_work_units(params, faces)
    if total > limits.max_work_units:
        raise LimitExceededError(
            "max_work_units",
            limits.max_work_units,
            round(total, 1),
            f"the request needs {total:.0f} work units (UNet steps × crop pixels / 512², summed over "
            f"{len(faces)} faces: {face_work_factor(params):g} steps per face at 512² with its cycles, hooks, "
            f"retries and ControlNet), over limits.max_work_units = {limits.max_work_units}; lower steps, cycle, "
            "guide_size or max_size, or the hooks' steps and retries",
            work_fields(params),
        )


def check_planned_names(faces: Sequence[PlannedFace]) -> None:
    """Every file name the planned faces ask for (LoRA tags) is a plain name inside its folder.

    The syntactic rule of :func:`facedetailer.safe_paths.check_name`, before any model work; the
    inpainter applies the full rule (symlinks included) where the folder is. Raises
    :class:`facedetailer.safe_paths.UnsafeNameError` naming the image, face and name.
    """
    from facedetailer.safe_paths import UnsafeNameError

    for face in faces:
        for name in face.loras:
            try:
                check_name(name, "LoRA")
            except UnsafeNameError as error:
                raise UnsafeNameError(name, f"{error.reason} (image {face.image_index}, face {face.position})",
                                      "LoRA") from None
