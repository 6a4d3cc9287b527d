"""A video's faces detailed: per-frame detection, face tracks with steady crops, batched sampling.

Three temporal modes (:class:`facedetailer.video_params.VideoParams`):

- ``frames``: FaceDetailer on every frame on its own, exactly :func:`serve_app.pipeline.detail_batch`'s
  result (frame k is image k of a batch: seed + k, its own boxes, crops and upscale);
- ``tracks``: faces linked into tracks (:mod:`facedetailer.tracks`), each frame's crop region of a
  track segment the same size around the low-passed box, one upscale per segment, seed
  ``track seed + k``;
- ``shared_noise``: as ``tracks``, every frame of a track sampled with the track's seed: equal seed
  and equal sample size give the same initial noise tensor (CPU randn over the latent shape).

Either way the frames' faces are crops like any other: a *segment* of ``segment_frames`` frames
sends all its crops to the inpainter in one call (the step-level engine shares UNet calls among
them), and several segments run at once, so Ray Serve spreads them over the inpainter replicas.
Seeds and crops are planned over the whole video before any sampling, so the result does not
depend on how the frames are cut into segments (up to the engine's float round-off between batch
sizes, at most one uint8 level). Nothing here imports Ray, a codec or a model library.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facedetailer.flicker import box_masks, flicker_ratio
from facedetailer.hooks import DetailerHooks
from facedetailer.params import FaceDetailerParams
from facedetailer.seeds import SEED_MODULUS, sampling_seed, track_frame_seed, track_seed
from facedetailer.segs import SEG, Box, Detection, detections_to_segs
from facedetailer.tracks import FrameBox, Track, TrackFrame, link_tracks, select_tracks, steady_crops
from facedetailer.video_params import VideoParams
from facedetailer.waves import refinement_waves
from facedetailer.wildcards import FacePrompt, plan_wildcards
from serve_app.patch_retry import refine_with_retries
from serve_app.pipeline import (
    ControlChoice,
    PipelineInputError,
    PlannedFace,
    RefinePlan,
    SegmentReport,
    Stages,
    _blend,
    check_hooks,
    plan_face,
    prepare_image,
)

DETECT_CONCURRENCY = 4  # detector calls in flight at once (the detector deployment queues the rest)
# hooks that act on detection or crop regions: a track's crops are planned from the track instead
_DETECTION_HOOKS = ("segs_ordered_filter", "segs_range_filter", "segs_label_filter", "coreml")

OnFramesDone = Callable[[int, int], None]  # (frames done so far, frames in all)


@dataclass(frozen=True)
class VideoFace:
    """One face of one frame to refine, in the frame's processing order."""

    frame: int
    position: int
    seg: SEG
    prompt: FacePrompt
    image_seed: int  # plan_face's seed + position rule when the prompt sets no seed
    upscale_box: Box | None = None  # the track segment's reference box (None: the seg's own bbox)
    track_id: int | None = None


@dataclass
class LatentCarry:
    """``latent_blend``: each track's last final latent, and the sample size it was made at."""

    weight: float
    latents: dict[int, tuple[tuple[int, int] | None, np.ndarray]] = field(default_factory=dict)

    def job_for(self, job: Any, track_id: int | None, sample_size: tuple[int, int] | None) -> Any:
        """``job`` asking for its final latent, and starting from the track's previous one if sizes match."""
        previous = self.latents.get(track_id) if track_id is not None else None
        if previous is not None and previous[0] == sample_size:
            return dataclasses.replace(job, init_latent=previous[1], init_latent_weight=self.weight, return_latent=True)
        return dataclasses.replace(job, return_latent=True)

    def keep(self, track_id: int | None, sample_size: tuple[int, int] | None, latent: np.ndarray | None) -> None:
        if track_id is not None and latent is not None:
            self.latents[track_id] = (sample_size, latent)


@dataclass
class TrackSegmentReport:
    """Frames of a track sampled at one crop size and upscale."""

    index: int
    first_frame: int
    last_frame: int
    crop_size: tuple[int, int]
    upscale: float | None = None
    upscaled_size: tuple[int, int] | None = None


@dataclass
class TrackReport:
    """A face track: where it is, how it was sampled (HTTP ``tracks``)."""

    track_id: int
    label: str
    first_frame: int
    last_frame: int
    frames: int
    detected_frames: int
    selected: bool
    position: int | None = None  # processing order among the selected tracks (its seed is seed + position)
    seed: int | None = None  # the track's seed (shared_noise: every frame's; tracks: + frame index)
    prompt: str | None = None
    skipped: bool = False
    skip_reason: str | None = None
    segments: list[TrackSegmentReport] = field(default_factory=list)


@dataclass
class VideoDetailResult:
    """The detailed frames and what was done to them."""

    frames: list[np.ndarray]
    temporal: str
    tracks: list[TrackReport]
    faces_refined: list[int]  # per frame
    face_boxes: list[list[Box]]  # per frame: the regions the flicker figure is measured in
    flicker: float  # face-region frame-to-frame change, output / input (1.0 = none added)
    segments: int  # frame segments the sampling was cut into
    timings: dict[str, float]
    frame_reports: list[list[SegmentReport]] = field(default_factory=list)


async def detail_video(
    frames: Sequence[np.ndarray],
    params: FaceDetailerParams,
    video: VideoParams,
    stages: Stages,
    *,
    make_job: Callable[..., Any],
    settings: Any,
    has_sam: bool = False,
    has_segm: bool = False,
    control: ControlChoice | None = None,
    parallel_segments: int = 2,
    check_work: Callable[[list[PlannedFace]], Awaitable[None] | None] | None = None,
    on_frames_done: OnFramesDone | None = None,
    wildcard_files: Any = None,
) -> VideoDetailResult:
    """Detail every frame's faces as ``video.temporal`` says (module docstring)."""
    check_hooks(params)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    settled: list[list[SegmentReport]] = [[] for _ in frames]  # faces decided before sampling (skipped)
    if video.temporal == "frames":
        faces, boxes, tracks, settled = await _plan_frames(
            frames, params, stages, has_sam=has_sam, has_segm=has_segm, wildcard_files=wildcard_files
        )
    else:
        _check_track_options(params)
        faces, boxes, tracks = await _plan_tracks(frames, params, video, stages, wildcard_files=wildcard_files)
    timings["detect"] = time.perf_counter() - started
    if check_work is not None:
        reserved = check_work(_planned_faces(faces, params))
        if inspect.isawaitable(reserved):  # the caller's quota, taken once the limits pass
            await reserved
    refine_started = time.perf_counter()
    carry = None
    segment_frames = video.segment_frames
    if video.latent_blend > 0.0 and video.temporal != "frames":
        # frame k starts from frame k − 1's result: frames one after another, one segment at a time
        carry, segment_frames, parallel_segments = LatentCarry(video.latent_blend), 1, 1
    segments = [list(range(start, min(start + segment_frames, len(frames))))
                for start in range(0, len(frames), segment_frames)]  # fmt: skip
    outputs, reports = await _refine_segments(
        frames, faces, settled, segments, params, stages, make_job, settings, control, parallel_segments,
        on_frames_done, carry,
    )  # fmt: skip
    timings["refine"] = time.perf_counter() - refine_started
    _fill_track_reports(tracks, reports)
    flicker = flicker_ratio(frames, outputs, box_masks(frames[0].shape[:2], boxes)) if frames else 1.0
    timings["pipeline"] = time.perf_counter() - started
    refined = [sum(1 for report in frame if not report.skipped) for frame in reports]
    return VideoDetailResult(
        frames=outputs,
        temporal=video.temporal,
        tracks=tracks,
        faces_refined=refined,
        face_boxes=boxes,
        flicker=flicker,
        segments=len(segments),
        timings=timings,
        frame_reports=reports,
    )


def _check_track_options(params: FaceDetailerParams) -> None:
    """What the tracks modes cannot honour yet: a 422 naming it, never a silent change."""
    if params.use_sam or params.use_segm:
        field_name = "use_sam" if params.use_sam else "use_segm"
        raise PipelineInputError(
            f"{field_name}: SAM / segm masks are not supported with temporal tracks yet; use temporal='frames'"
        )
    hooks = DetailerHooks.of(params.detailer_hooks)
    for index, hook in enumerate(hooks.hooks):
        if hook.type in _DETECTION_HOOKS:
            raise PipelineInputError(
                f"detailer_hooks[{index}]: {hook.type} changes detections or crop regions, which tracks plan "
                "themselves; use pick_tracks / track_ids, or temporal='frames'"
            )


async def _bounded(calls: Sequence[Callable[[], Any]], limit: int) -> list[Any]:
    """Await ``calls`` (coroutine factories) with at most ``limit`` in flight; results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Any]) -> Any:
        async with gate:
            return await call()

    return list(await asyncio.gather(*(one(call) for call in calls)))


async def _plan_frames(
    frames: Sequence[np.ndarray],
    params: FaceDetailerParams,
    stages: Stages,
    *,
    has_sam: bool,
    has_segm: bool,
    wildcard_files: Any,
) -> tuple[list[list[VideoFace]], list[list[Box]], list[TrackReport], list[list[SegmentReport]]]:
    """FaceDetailer's own plan for each frame: frame k is image k of a batch (seed + k)."""
    prepared = await _bounded(
        [
            lambda image=image, index=index: prepare_image(
                image, index, params, stages, has_sam=has_sam, has_segm=has_segm, wildcard_files=wildcard_files
            )
            for index, image in enumerate(frames)
        ],
        DETECT_CONCURRENCY,
    )
    faces = [
        [VideoFace(item.index, position, seg, prompt, item.image_seed) for position, seg, prompt in item.pending]
        for item in prepared
    ]
    boxes = [[seg.bbox for _, seg, _ in item.pending] for item in prepared]
    return faces, boxes, [], [list(item.reports) for item in prepared]


async def _plan_tracks(
    frames: Sequence[np.ndarray], params: FaceDetailerParams, video: VideoParams, stages: Stages, *, wildcard_files: Any
) -> tuple[list[list[VideoFace]], list[list[Box]], list[TrackReport]]:
    """Detect, link, pick, smooth; then each selected track's face in each of its frames."""
    found = await _bounded(
        [lambda image=image: stages.detect(image, params.bbox_threshold) for image in frames], DETECT_CONCURRENCY
    )
    min_side = max(int(params.drop_size), 1)  # detections_to_segs' size filter
    per_frame = [
        [
            FrameBox(tuple(float(v) for v in d.bbox), float(d.confidence), d.label)  # type: ignore[arg-type]
            for d in detections
            if d.bbox[2] - d.bbox[0] > min_side and d.bbox[3] - d.bbox[1] > min_side
        ]
        for detections in found
    ]
    all_tracks = link_tracks(per_frame, iou_threshold=video.track_iou, max_gap=video.max_gap)
    try:
        chosen = select_tracks(
            all_tracks,
            pick=video.pick_tracks,
            ids=video.track_ids,
            max_tracks=video.max_tracks,
            min_frames=video.min_track_frames,
        )
    except ValueError as error:
        raise PipelineInputError(str(error)) from error
    height, width = frames[0].shape[:2] if frames else (0, 0)
    planned: dict[int, tuple[list[TrackFrame], list[Any]]] = {
        track.track_id: steady_crops(
            track,
            (width, height),
            crop_factor=params.bbox_crop_factor,
            window=video.smooth_window,
            size_tolerance=video.size_tolerance,
        )
        for track in chosen
    }
    reports = {track.track_id: _track_report(track, selected=False) for track in all_tracks}
    faces: list[list[VideoFace]] = [[] for _ in frames]
    boxes: list[list[Box]] = [[] for _ in frames]
    if not chosen:
        return faces, boxes, list(reports.values())
    # the wildcard plan over the tracks, as over one image's faces: order, prompts, seed + position
    first_segs = [_track_seg(frames[planned[t.track_id][0][0].frame], t, planned[t.track_id][0][0], params)
                  for t in chosen]  # fmt: skip
    plan = plan_wildcards(params.wildcard, first_segs, seed=params.seed, wildcard_files=wildcard_files)
    shared = video.temporal == "shared_noise"
    active: list[tuple[int, Track, FacePrompt, int]] = []  # (position, track, prompt, track seed)
    stopped = False
    for position, (index, prompt) in enumerate(zip(plan.order, plan.prompts, strict=True)):
        track = chosen[index]
        report = reports[track.track_id]
        report.selected, report.position = True, position
        seed_of_track = prompt.seed if prompt.seed is not None else track_seed(params.seed, position)
        report.seed = seed_of_track
        if stopped or prompt.stop:
            stopped = True
            report.skipped, report.skip_reason = True, "[STOP]"
            continue
        if prompt.skip:
            report.skipped, report.skip_reason = True, "[SKIP]"
            continue
        active.append((position, track, prompt, seed_of_track))
    for position, track, prompt, seed_of_track in active:
        track_frames, segments = planned[track.track_id]
        reports[track.track_id].segments = [
            TrackSegmentReport(s.index, s.first_frame, s.last_frame, s.crop_size) for s in segments
        ]
        for item in track_frames:
            segment = segments[item.segment]
            seg = _track_seg(frames[item.frame], track, item, params)
            # only the box's size counts in the upscale rule: at the origin, every frame's is bit-equal
            upscale_box = (0.0, 0.0, *segment.reference_box)
            frame_seed = track_frame_seed(seed_of_track, item.frame, shared_noise=shared)
            faces[item.frame].append(
                VideoFace(
                    item.frame,
                    position,
                    seg,
                    dataclasses.replace(prompt, seed=frame_seed),
                    sampling_seed(params.seed, item.frame, 0, 0),
                    upscale_box=upscale_box,
                    track_id=track.track_id,
                )
            )
            boxes[item.frame].append(item.bbox)
    for frame_faces in faces:
        frame_faces.sort(key=lambda face: face.position)
    return faces, boxes, sorted(reports.values(), key=lambda report: report.track_id)


def _track_seg(image: np.ndarray, track: Track, item: TrackFrame, params: FaceDetailerParams) -> SEG:
    """The track's SEG in one frame: the steady crop region, the smoothed box's dilated mask."""
    detection = Detection(track.label, item.bbox, track.confidences[item.frame])
    segs = detections_to_segs(
        image,
        [detection],
        dilation=params.bbox_dilation,
        crop_factor=params.bbox_crop_factor,
        drop_size=0,  # the detections were filtered by drop_size before linking
        post_crop_region=lambda *_: item.crop_region,
    )
    if not segs.segs:  # a smoothed box of 1 px or less: keep the region, an empty mask skips it
        mask = np.zeros((item.crop_region[3] - item.crop_region[1], item.crop_region[2] - item.crop_region[0]),
                        np.float32)  # fmt: skip
        return SEG(item.crop_region, item.bbox, mask, detection.confidence, track.label)
    return segs.segs[0]


def _track_report(track: Track, *, selected: bool) -> TrackReport:
    return TrackReport(
        track_id=track.track_id,
        label=track.label,
        first_frame=track.first_frame,
        last_frame=track.last_frame,
        frames=track.length,
        detected_frames=sum(track.detected.values()),
        selected=selected,
    )


def _planned_faces(faces: Sequence[Sequence[VideoFace]], params: FaceDetailerParams) -> list[PlannedFace]:
    """Every face the inpainter will sample, with its sample size (work limits before sampling)."""
    from facedetailer.guide_size import plan_upscale
    from facedetailer.prompts import face_conditioning

    hooks = DetailerHooks.of(params.detailer_hooks)
    planned = []
    for frame_faces in faces:
        for face in frame_faces:
            x1, y1, x2, y2 = face.seg.crop_region
            plan = plan_upscale(
                (x2 - x1, y2 - y1),
                face.seg.bbox if face.upscale_box is None else face.upscale_box,
                guide_size=params.guide_size,
                guide_size_for_bbox=params.guide_size_for,
                max_size=params.max_size,
                force_inpaint=params.force_inpaint,
            )
            if plan.skip or not np.any(face.seg.cropped_mask):
                continue
            loras = tuple(lora.name for lora in face_conditioning(params.positive, params.negative, face.prompt).loras)
            planned.append(PlannedFace(face.frame, face.position, hooks.touch_scaled_size(*plan.new_size), loras))
    return planned


async def _refine_segments(
    frames: Sequence[np.ndarray],
    faces: Sequence[Sequence[VideoFace]],
    settled: Sequence[Sequence[SegmentReport]],
    segments: Sequence[Sequence[int]],
    params: FaceDetailerParams,
    stages: Stages,
    make_job: Callable[..., Any],
    settings: Any,
    control: ControlChoice | None,
    parallel_segments: int,
    on_frames_done: OnFramesDone | None,
    carry: LatentCarry | None = None,
) -> tuple[list[np.ndarray], list[list[SegmentReport]]]:
    """Refine segment by segment (``parallel_segments`` at once); frames in order in the result."""
    outputs = list(frames)
    reports: list[list[SegmentReport]] = [[] for _ in frames]
    done = 0

    async def run(segment: Sequence[int]) -> None:
        nonlocal done
        finished = await _refine_segment(frames, faces, segment, params, stages, make_job, settings, control, carry)
        for frame, (image, frame_reports) in finished.items():
            outputs[frame] = image
            reports[frame] = sorted([*settled[frame], *frame_reports], key=lambda report: report.index)
        done += len(segment)
        if on_frames_done is not None:
            on_frames_done(done, len(frames))

    await _bounded([lambda segment=segment: run(segment) for segment in segments], max(1, parallel_segments))
    return outputs, reports


async def _refine_segment(
    frames: Sequence[np.ndarray],
    faces: Sequence[Sequence[VideoFace]],
    segment: Sequence[int],
    params: FaceDetailerParams,
    stages: Stages,
    make_job: Callable[..., Any],
    settings: Any,
    control: ControlChoice | None,
    carry: LatentCarry | None = None,
) -> dict[int, tuple[np.ndarray, list[SegmentReport]]]:
    """One segment's frames: wave w of every frame in ONE inpainter call, then blend, then wave w + 1.

    Within a frame, faces whose crops overlap an earlier face's wait for its result, as FaceDetailer
    refines faces one after another on the live image (:func:`refinement_waves`).
    """
    hooks = DetailerHooks.of(params.detailer_hooks)
    current = {frame: frames[frame] for frame in segment}
    reports: dict[int, list[SegmentReport]] = {frame: [] for frame in segment}
    waves = {frame: refinement_waves([face.seg.crop_region for face in faces[frame]]) for frame in segment}
    latents: dict[int, Any] = {}  # id(job) → its final latent (latent_blend; the jobs live until the end)
    for wave in range(max((len(item) for item in waves.values()), default=0)):
        ready: list[tuple[int, RefinePlan, VideoFace]] = []
        for frame in segment:
            if wave >= len(waves[frame]):
                continue
            for member in waves[frame][wave]:
                face = faces[frame][member]
                if not np.any(face.seg.cropped_mask):
                    report = _skipped(face, "empty mask")
                    reports[frame].append(report)
                    continue
                plan = plan_face(
                    current[frame], face.seg, face.position, face.prompt, params, face.image_seed, make_job,
                    control, upscale_box=face.upscale_box,
                )  # fmt: skip
                if isinstance(plan, SegmentReport):
                    plan.image_index = frame
                    reports[frame].append(plan)
                else:
                    plan.report.image_index = frame
                    if carry is not None:
                        plan.job = carry.job_for(plan.job, face.track_id, plan.report.upscaled_size)
                    ready.append((frame, plan, face))
        if not ready:
            continue

        async def refine(jobs: list[Any]) -> list[np.ndarray]:
            outcome = await stages.refine(jobs, settings)
            for job, latent in zip(jobs, getattr(outcome, "latents", None) or [None] * len(jobs), strict=True):
                latents[id(job)] = latent
            return list(getattr(outcome, "images", outcome))

        plans = [plan for _, plan, _ in ready]
        first = await refine([plan.job for plan in plans])
        refined = await refine_with_retries(plans, first, hooks, refine)
        for (frame, plan, face), image in zip(ready, refined, strict=True):
            current[frame], _, _ = _blend(current[frame], plan, image, params)
            reports[frame].append(plan.report)
            if carry is not None:
                carry.keep(face.track_id, plan.report.upscaled_size, latents.get(id(plan.job)))
    return {frame: (current[frame], reports[frame]) for frame in segment}


def _skipped(face: VideoFace, reason: str) -> SegmentReport:
    x1, y1, x2, y2 = face.seg.crop_region
    return SegmentReport(
        index=face.position,
        bbox=face.seg.bbox,
        crop_region=(x1, y1, x2, y2),
        confidence=face.seg.confidence,
        label=face.seg.label,
        skipped=True,
        skip_reason=reason,
        image_index=face.frame,
        seed=face.prompt.seed if face.prompt.seed is not None else (face.image_seed + face.position) % SEED_MODULUS,
    )


def _fill_track_reports(tracks: list[TrackReport], reports: Sequence[Sequence[SegmentReport]]) -> None:
    """Each track segment's upscale and sample size, as planned for its first refined frame."""
    by_track = {track.track_id: track for track in tracks}
    if not by_track:
        return
    for track in tracks:
        for segment in track.segments:
            for frame in range(segment.first_frame, segment.last_frame + 1):
                report = next((r for r in reports[frame] if r.index == track.position), None)
                if report is not None and report.upscale is not None:
                    segment.upscale = report.upscale
                    segment.upscaled_size = report.upscaled_size
                    break
