"""FaceDetailer's per-image cycle: detect → (SAM | segm) → plan → refine each face → blend.

The stages are reached through the small async :class:`Stages` protocol, so the same code runs
behind Ray Serve deployment handles (the ingress) and with in-process models (tests, the
benchmark's in-process baseline). Nothing here imports Ray or a model library.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from facedetailer.blend import blend_face, feather_mask, resize_image, rgba_with_alpha
from facedetailer.controlnet import ControlHint, ControlNetParams, control_image_for_face
from facedetailer.guide_size import plan_upscale
from facedetailer.hooks import DetailerHooks
from facedetailer.outputs import node_list, sorted_by_shape
from facedetailer.params import FaceDetailerParams
from facedetailer.prompts import face_conditioning
from facedetailer.sam_prompts import SamPrompt, combine_sam_masks, make_sam_prompts, select_sam_masks
from facedetailer.seeds import SEED_MODULUS, sampling_seed
from facedetailer.segs import (
    SEG,
    SEGS,
    Box,
    Detection,
    detections_to_segs,
    segs_bitwise_and_mask,
    segs_to_combined_mask,
)
from facedetailer.waves import refinement_waves
from facedetailer.wildcards import FacePrompt, plan_wildcards
from serve_app.patch_retry import BlackPatchError, refine_with_retries


class Stages(Protocol):
    """What the cycle needs from the model deployments."""

    async def detect(self, image: np.ndarray, threshold: float) -> list[Detection]: ...

    async def detect_segm(self, image: np.ndarray, threshold: float) -> list[Detection]: ...

    async def segment(self, image: np.ndarray, prompts: Sequence[SamPrompt]) -> list[Any]: ...

    async def refine(self, jobs: Sequence[Any], settings: Any) -> Any: ...  # RefineResult or list of images


class StepListener(Protocol):
    """Who follows the inpainter's sampling of a request (a progress stream): optional.

    ``planned`` gets every face the inpainter will sample, once, before it starts; ``step`` gets
    each sampler step the inpainter reports for a face (its image, its report so far, the step
    event of the ``Stages.refine`` call, e.g. :class:`deployments.step_progress.StepEvent`).
    """

    def planned(self, faces: list[PlannedFace]) -> None: ...

    def step(self, image_index: int, face: SegmentReport, event: Any) -> None: ...


class PipelineInputError(ValueError):
    """The request cannot be served as asked (e.g. SAM requested but not deployed)."""


__all__ = ["BlackPatchError", "PipelineInputError", "detail_batch", "prepare_image", "refine_image"]


@dataclass
class SegmentReport:
    """Per-face metadata returned with the result (HTTP ``segments``)."""

    index: int
    bbox: tuple[float, float, float, float]
    crop_region: tuple[int, int, int, int]
    confidence: float
    label: str
    seed: int | None = None
    upscale: float | None = None
    upscaled_size: tuple[int, int] | None = None
    skipped: bool = False
    skip_reason: str | None = None
    prompt: str | None = None
    image_index: int = 0  # which image of the batch


@dataclass
class ImageResult:
    """Every output of spec §8 for one image."""

    image: np.ndarray
    mask: np.ndarray
    cropped_refined: list[np.ndarray]
    cropped_enhanced_alpha: list[np.ndarray]
    segments: list[SegmentReport]
    timings: dict[str, float] = field(default_factory=dict)
    cnet_images: list[np.ndarray] = field(default_factory=list)  # control images (none without ControlNet)


@dataclass
class DetailResult:
    """The batch result, the node's outputs in its shapes (lists joined across images)."""

    images: list[np.ndarray]
    masks: np.ndarray  # [B, H, W] when sizes agree, else see ``per_image``
    cropped_refined: list[np.ndarray]
    cropped_enhanced_alpha: list[np.ndarray]
    cnet_images: list[np.ndarray]
    per_image: list[ImageResult]
    detailer_pipe: dict[str, Any]
    timings: dict[str, float]


@dataclass
class _Timer:
    timings: dict[str, float]

    async def run(self, stage: str, awaitable: Awaitable[Any]) -> Any:
        start = time.perf_counter()
        try:
            return await awaitable
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def measure(self, stage: str, function: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return function()
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


async def build_segs(
    image: np.ndarray, params: FaceDetailerParams, stages: Stages, timer: _Timer, *, has_sam: bool, has_segm: bool
) -> SEGS:
    """Detection and mask refinement (spec §2, §3): SAM takes priority over the segm detector.

    The bbox detection runs the hooks' ``post_crop_region`` and ``post_detection`` (§9); the segm
    detector runs without hooks, as in the reference.
    """
    hooks = DetailerHooks.of(params.detailer_hooks)
    detections = await timer.run("detect", stages.detect(image, params.bbox_threshold))
    segs = detections_to_segs(
        image,
        detections,
        dilation=params.bbox_dilation,
        crop_factor=params.bbox_crop_factor,
        drop_size=params.drop_size,
        post_crop_region=hooks.post_crop_region if hooks else None,
    )
    segs = hooks.post_detection(segs)
    if params.use_sam:
        if not has_sam:
            raise PipelineInputError("use_sam is set but this service has no SAM deployment")
        if not segs.segs:
            return segs
        prompts = make_sam_prompts(
            segs,
            detection_hint=params.sam_detection_hint,
            bbox_expansion=params.sam_bbox_expansion,
            mask_hint_threshold=params.sam_mask_hint_threshold,
            mask_hint_use_negative=params.sam_mask_hint_use_negative,
        )
        predictions = await timer.run("sam", stages.segment(image, prompts))
        selected: list[np.ndarray] = []
        for prediction in predictions:
            selected.extend(select_sam_masks(prediction.masks, prediction.scores, params.sam_threshold))
        sam_mask = combine_sam_masks(selected, segs.shape, params.sam_dilation)
        return segs_bitwise_and_mask(segs, sam_mask)
    if params.use_segm:
        if not has_segm:
            raise PipelineInputError("use_segm is set but this service has no segm detector deployment")
        segm_detections = await timer.run("detect_segm", stages.detect_segm(image, params.bbox_threshold))
        segm_segs = detections_to_segs(
            image,
            segm_detections,
            dilation=params.bbox_dilation,
            crop_factor=params.bbox_crop_factor,
            drop_size=params.drop_size,
        )
        if params.override_bbox_by_segm:
            return segm_segs
        return segs_bitwise_and_mask(segs, segs_to_combined_mask(segm_segs))
    return segs


@dataclass(frozen=True)
class ControlChoice:
    """A request's ControlNet, resolved: its settings, the configured preprocessor, the decoded image."""

    params: ControlNetParams
    preprocessor: str  # "tile" or "control_image" (facedetailer/controlnet.py)
    image: np.ndarray | None = None  # the request's whole-picture control image, uint8 [H, W, 3]


def resolve_control(
    params: FaceDetailerParams, preprocessors: Mapping[str, str], decode: Callable[[str], np.ndarray]
) -> ControlChoice | None:
    """Check the request's ``controlnet`` against the configured ones (``{name: preprocessor}``)."""
    wanted = params.controlnet
    if wanted is None:
        return None
    if wanted.name not in preprocessors:
        configured = ", ".join(preprocessors) or "none"
        raise PipelineInputError(f"controlnet.name: unknown {wanted.name!r}; configured: {configured}")
    preprocessor = preprocessors[wanted.name]
    if preprocessor == "control_image" and wanted.control_image is None:
        raise PipelineInputError(
            f"controlnet.control_image: ControlNet {wanted.name!r} takes its control image from the request; send one"
        )
    image = decode(wanted.control_image) if wanted.control_image is not None else None
    return ControlChoice(params=wanted, preprocessor=preprocessor, image=image)


@dataclass
class RefinePlan:
    """One face ready for the inpainter, and how to bring its result back."""

    position: int
    seg: SEG
    report: SegmentReport
    job: Any
    crop_size: tuple[int, int]
    paste_mask: np.ndarray
    cnet_image: np.ndarray | None = None  # the face's ControlNet control image (cnet_images)


def _report(position: int, seg: SEG) -> SegmentReport:
    return SegmentReport(
        index=position,
        bbox=tuple(float(v) for v in seg.bbox),  # type: ignore[arg-type]
        crop_region=tuple(int(v) for v in seg.crop_region),  # type: ignore[arg-type]
        confidence=float(seg.confidence),
        label=seg.label,
    )


def plan_face(
    current: np.ndarray,
    seg: SEG,
    position: int,
    prompt: FacePrompt,
    params: FaceDetailerParams,
    image_seed: int,
    make_job: Callable[..., Any],
    control: ControlChoice | None = None,
    upscale_box: Box | None = None,
) -> RefinePlan | SegmentReport:
    """Crop from the *current* image and decide the upscale (spec §4); None-like → a report.

    ``upscale_box`` replaces ``seg.bbox`` in the upscale rule (a video track segment plans one
    upscale for all its frames from its reference box, serve_app/video).
    """
    report = _report(position, seg)
    seed = prompt.seed if prompt.seed is not None else (image_seed + position) % SEED_MODULUS
    report.seed = seed
    x1, y1, x2, y2 = seg.crop_region
    crop = current[y1:y2, x1:x2]
    crop_h, crop_w = crop.shape[:2]
    plan = plan_upscale(
        (crop_w, crop_h),
        seg.bbox if upscale_box is None else upscale_box,
        guide_size=params.guide_size,
        guide_size_for_bbox=params.guide_size_for,
        max_size=params.max_size,
        force_inpaint=params.force_inpaint,
    )
    report.upscale = float(plan.upscale)
    if plan.skip:
        report.skipped, report.skip_reason = True, plan.reason
        return report
    new_size = DetailerHooks.of(params.detailer_hooks).touch_scaled_size(*plan.new_size)
    report.upscaled_size = new_size
    upscaled = resize_image(crop, new_size)
    noise_mask = None
    if params.noise_mask:
        # at the crop's own size: the sampler resizes it to the latent grid in one step (reference §6.3)
        noise_mask = feather_mask(seg.cropped_mask, params.noise_mask_feather)
    conditioning = face_conditioning(params.positive, params.negative, prompt)
    report.prompt = " BREAK ".join(conditioning.positive)
    cnet_image, control_fields = None, {}
    if control is not None:  # listed even at strength 0, as the reference's wrapper does
        image_h, image_w = current.shape[:2]
        cnet_image = control_image_for_face(
            control.preprocessor, upscaled, seg.crop_region, (image_w, image_h), control.image
        )
        wanted = control.params
        if wanted.active:
            control_fields["control"] = ControlHint(
                wanted.name, wanted.strength, wanted.start_percent, wanted.end_percent, cnet_image
            )
    job = make_job(
        image=upscaled,
        noise_mask=noise_mask,
        positive=conditioning.positive,
        negative=conditioning.negative,
        seed=seed,
        loras=tuple((lora.name, lora.model_weight, lora.clip_weight) for lora in conditioning.loras),
        **control_fields,
    )
    return RefinePlan(
        position=position,
        seg=seg,
        report=report,
        job=job,
        crop_size=(crop_w, crop_h),
        paste_mask=feather_mask(seg.cropped_mask, params.feather),
        cnet_image=cnet_image,
    )


@dataclass(frozen=True)
class PlannedFace:
    """A face the inpainter will sample, known before any inpainter work (for work limits)."""

    image_index: int
    position: int
    sample_size: tuple[int, int]  # (width, height) of the upscaled crop the inpainter samples
    loras: tuple[str, ...] = ()  # LoRA names the face's prompt asks for
    positive: tuple[str, ...] = ()  # the face's prompt chunks, as its RefineJob gets them (prompt limits)
    negative: tuple[str, ...] | None = ()  # None: negative: null (basic guidance, no negative row)
    crop_region: tuple[int, int, int, int] = (0, 0, 0, 0)  # where in the image (x1, y1, x2, y2)


@dataclass
class PreparedImage:
    """One image after detection, mask refinement and the wildcard plan: what remains is sampling."""

    image: np.ndarray
    index: int
    mask: np.ndarray
    image_seed: int
    reports: list[SegmentReport]  # faces already settled (skipped, empty mask)
    pending: list[tuple[int, SEG, FacePrompt]]  # (position, seg, prompt) to refine, in order
    timings: dict[str, float]


async def prepare_image(
    image: np.ndarray,
    image_index: int,
    params: FaceDetailerParams,
    stages: Stages,
    *,
    has_sam: bool = False,
    has_segm: bool = False,
    on_face: Callable[[SegmentReport], None] | None = None,
    wildcard_files: Mapping[str, Sequence[str]] | None = None,
) -> PreparedImage:
    """Detect (and SAM / segm), then decide which faces are refined with which prompt (spec §2–§3, §7)."""
    timings: dict[str, float] = {}
    timer = _Timer(timings)

    def emit(report: SegmentReport) -> None:
        report.image_index = image_index
        if on_face is not None:
            on_face(report)

    segs = await build_segs(image, params, stages, timer, has_sam=has_sam, has_segm=has_segm)
    mask = timer.measure("blend", lambda: segs_to_combined_mask(segs))
    image_seed = sampling_seed(params.seed, image_index, 0, 0)
    plan = plan_wildcards(params.wildcard, segs.segs, seed=image_seed, wildcard_files=wildcard_files)
    reports: list[SegmentReport] = []
    pending: list[tuple[int, SEG, FacePrompt]] = []
    for position, (seg_index, prompt) in enumerate(zip(plan.order, plan.prompts, strict=True)):
        seg = segs.segs[seg_index]
        reason = "empty mask" if not np.any(seg.cropped_mask) else "[SKIP]" if prompt.skip else None
        if reason is None and prompt.stop:
            break
        if reason is not None:
            report = _report(position, seg)
            report.skipped, report.skip_reason = True, reason
            reports.append(report)
            emit(report)
            continue
        pending.append((position, seg, prompt))
    return PreparedImage(image, image_index, mask, image_seed, reports, pending, timings)


def planned_faces(prepared: PreparedImage, params: FaceDetailerParams) -> list[PlannedFace]:
    """The faces of ``prepared`` the inpainter will sample, with their sample sizes (spec §4).

    Sizes depend only on the crop region and bbox, not on pixels refined earlier, so they are
    known before the first inpainter call; faces the upscale rule skips are left out.
    """
    hooks = DetailerHooks.of(params.detailer_hooks)
    faces = []
    for position, seg, prompt in prepared.pending:
        x1, y1, x2, y2 = seg.crop_region
        plan = plan_upscale(
            (x2 - x1, y2 - y1),
            seg.bbox,
            guide_size=params.guide_size,
            guide_size_for_bbox=params.guide_size_for,
            max_size=params.max_size,
            force_inpaint=params.force_inpaint,
        )
        if not plan.skip:
            size = hooks.touch_scaled_size(*plan.new_size)  # as plan_face does
            conditioning = face_conditioning(params.positive, params.negative, prompt)
            loras = tuple(lora.name for lora in conditioning.loras)
            faces.append(
                PlannedFace(
                    prepared.index,
                    position,
                    size,
                    loras,
                    conditioning.positive,
                    conditioning.negative,
                    tuple(int(value) for value in seg.crop_region),  # type: ignore[arg-type]
                )
            )
    return faces


async def refine_image(
    prepared: PreparedImage,
    params: FaceDetailerParams,
    stages: Stages,
    *,
    make_job: Callable[..., Any],
    settings: Any,
    batch_faces: bool = True,
    on_face: Callable[[SegmentReport], None] | None = None,
    control: ControlChoice | None = None,
    progress: StepListener | None = None,
) -> ImageResult:
    """Refine the prepared faces and blend them back (spec §4–§8).

    Faces are refined in waves (:func:`refinement_waves`): faces whose crops overlap an earlier
    face wait for its result, as in the reference's one-by-one loop; the others share one
    inpainter call. ``batch_faces=False`` refines strictly one face per call.
    """
    timer = _Timer(prepared.timings)

    def emit(report: SegmentReport) -> None:
        report.image_index = prepared.index
        if on_face is not None:
            on_face(report)

    pending = prepared.pending
    reports = list(prepared.reports)
    waves = (
        refinement_waves([seg.crop_region for _, seg, _ in pending])
        if batch_faces
        else [[index] for index in range(len(pending))]
    )
    current = prepared.image
    hooks = DetailerHooks.of(params.detailer_hooks)
    refined_crops: list[tuple[int, np.ndarray]] = []  # (position in the processing order, crop)
    alpha_crops: list[tuple[int, np.ndarray]] = []
    cnet_images: list[tuple[int, np.ndarray]] = []
    for wave in waves:
        ready: list[RefinePlan] = []
        for member in wave:
            position, seg, prompt = pending[member]
            face = plan_face(current, seg, position, prompt, params, prepared.image_seed, make_job, control)
            if isinstance(face, SegmentReport):
                reports.append(face)
                emit(face)
            else:
                ready.append(face)
        if not ready:
            continue

        async def refine(jobs: list[Any], ready: list[RefinePlan] = ready) -> list[np.ndarray]:
            if progress is None:
                call = stages.refine(jobs, settings)
            else:  # only then: a Stages implementation need not know the keyword
                faces = [_plan_of(job, ready) for job in jobs]

                def on_step(event: Any, faces: list[RefinePlan] = faces) -> None:
                    progress.step(prepared.index, faces[event.index].report, event)

                call = stages.refine(jobs, settings, on_progress=on_step)
            outcome = await timer.run("inpaint", call)
            # a RefineResult (images + the inpainter's queue wait) or a plain list of images
            if hasattr(outcome, "queue_wait_s"):
                waited = prepared.timings.get("inpaint_queue_wait", 0.0)
                prepared.timings["inpaint_queue_wait"] = waited + outcome.queue_wait_s
            if hasattr(outcome, "engine_s"):  # the engine's own time: inpaint − inpaint_engine is the hop
                prepared.timings["inpaint_engine"] = prepared.timings.get("inpaint_engine", 0.0) + outcome.engine_s
            return list(getattr(outcome, "images", outcome))

        first = await refine([face.job for face in ready])
        refined_batch = await refine_with_retries(ready, first, hooks, refine)  # should_retry_patch
        for face, refined in zip(ready, refined_batch, strict=True):
            current, refined_crop, alpha = timer.measure(
                "blend", lambda image=current, f=face, r=refined: _blend(image, f, r, params)
            )
            refined_crops.append((face.position, refined_crop))
            alpha_crops.append((face.position, alpha))
            if face.cnet_image is not None:
                cnet_images.append((face.position, face.cnet_image))
            reports.append(face.report)
            emit(face.report)
    reports.sort(key=lambda report: report.index)
    return ImageResult(
        image=current,
        mask=prepared.mask,
        cropped_refined=sorted_by_shape(_in_processing_order(refined_crops)),
        cropped_enhanced_alpha=sorted_by_shape(_in_processing_order(alpha_crops)),
        segments=reports,
        timings=prepared.timings,
        # the reference extends this list as faces are refined, unsorted
        cnet_images=_in_processing_order(cnet_images),
    )


def _blend(
    current: np.ndarray, face: RefinePlan, refined: np.ndarray, params: FaceDetailerParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bring a refined crop back to crop size and paste it through the feathered mask (spec §6).

    The seam options (color_match, blend) apply here; the crop lists get the crop as pasted.
    """
    refined_crop = resize_image(np.asarray(refined), face.crop_size)
    pasted, refined_crop = blend_face(
        current,
        refined_crop,
        face.paste_mask,
        face.seg.crop_region,
        face_mask=face.seg.cropped_mask,
        color_match=params.color_match,
        color_match_strength=params.color_match_strength,
        blend=params.blend,
    )
    return pasted, refined_crop, rgba_with_alpha(refined_crop, face.paste_mask)


def _plan_of(job: Any, ready: Sequence[RefinePlan]) -> RefinePlan:
    """The face a job samples: its plan's job, or a black-patch retry's copy (same image, other seed)."""
    return next((face for face in ready if face.job is job), None) or next(
        face for face in ready if face.job.image is job.image
    )


def _in_processing_order(crops: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
    """Waves finish faces out of order; the node's lists follow the processing order."""
    return [crop for _, crop in sorted(crops, key=lambda item: item[0])]


def check_hooks(params: FaceDetailerParams) -> None:
    """Refuse hooks this pipeline cannot honour yet, and a segm override the reference would ignore."""
    hooks = DetailerHooks.of(params.detailer_hooks)
    for index, hook_type in hooks.unwired():
        raise PipelineInputError(f"detailer_hooks[{index}]: not supported yet: {hook_type}")
    if params.use_segm and params.override_bbox_by_segm and not hooks.allows_segm_override:
        raise PipelineInputError(
            "override_bbox_by_segm: the reference ignores it when a detailer hook other than a lone "
            "coreml hook is attached; drop the hooks or the override"
        )


async def detail_batch(
    images: Sequence[np.ndarray],
    params: FaceDetailerParams,
    stages: Stages,
    *,
    make_job: Callable[..., Any],
    settings: Any,
    has_sam: bool = False,
    has_segm: bool = False,
    batch_faces: bool = True,
    on_face: Callable[[SegmentReport], None] | None = None,
    check_work: Callable[[list[PlannedFace]], Awaitable[None] | None] | None = None,
    wildcard_files: Mapping[str, Sequence[str]] | None = None,
    control: ControlChoice | None = None,
    progress: StepListener | None = None,
) -> DetailResult:
    """Each image on its own with base seed + k (spec §6); the lists joined like the node's.

    Every image is prepared (detection, masks, wildcard plan) before any face is refined, so
    ``check_work`` sees every face the request would sample, with its size, and can refuse the
    request (by raising, also from the awaitable it may return) before the inpainter does any work.
    """
    check_hooks(params)
    start = time.perf_counter()
    prepared = [
        await prepare_image(
            image,
            index,
            params,
            stages,
            has_sam=has_sam,
            has_segm=has_segm,
            on_face=on_face,
            wildcard_files=wildcard_files,
        )
        for index, image in enumerate(images)
    ]
    if check_work is not None or progress is not None:
        planned = [face for item in prepared for face in planned_faces(item, params)]
        if check_work is not None:
            checked = check_work(planned)
            if checked is not None:
                await checked  # e.g. the caller's quota, asked of a shared ledger
        if progress is not None:
            progress.planned(planned)
    per_image = [
        await refine_image(
            item,
            params,
            stages,
            make_job=make_job,
            settings=settings,
            batch_faces=batch_faces,
            on_face=on_face,
            control=control,
            progress=progress,
        )
        for item in prepared
    ]
    timings: dict[str, float] = {}
    for result in per_image:
        for stage, seconds in result.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    timings["pipeline"] = time.perf_counter() - start
    shapes = {result.mask.shape for result in per_image}
    masks = np.stack([result.mask for result in per_image]) if len(shapes) == 1 else np.empty((0, 0, 0))
    return DetailResult(
        images=[result.image for result in per_image],
        masks=masks,
        cropped_refined=node_list([result.cropped_refined for result in per_image]),
        cropped_enhanced_alpha=node_list([result.cropped_enhanced_alpha for result in per_image]),
        cnet_images=node_list([result.cnet_images for result in per_image]),
        per_image=per_image,
        detailer_pipe={"params": params.model_dump(exclude={"controlnet": {"control_image"}})},
        timings=timings,
    )
