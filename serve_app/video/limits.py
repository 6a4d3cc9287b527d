"""A video's limits (``limits.max_video_*``): refused with 422 before decoding or sampling.

The container's duration, frame count and frame size are checked before a frame is decoded
(the frame count again while decoding, for containers that do not tell it); the faces to sample,
with their sizes, after detection and before the inpainter: each crop and each frame against the
image limits (``max_sample_pixels``, ``max_faces_per_image``), the whole video against
``max_video_work_units``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from facedetailer.params import FaceDetailerParams
from serve_app.config import Limits
from serve_app.limits import LimitExceededError, check_planned_work, face_work_factor, face_work_units, work_fields
from serve_app.pipeline import PlannedFace
from serve_app.video.codec import VideoInfo


def check_video_info(info: VideoInfo, limits: Limits) -> None:
    """Duration, frames (when the container knows them) and frame size."""
    if info.duration_s > limits.max_video_seconds:
        raise LimitExceededError(
            "max_video_seconds",
            limits.max_video_seconds,
            round(info.duration_s, 3),
            f"video: {info.duration_s:.2f} s long, over limits.max_video_seconds = {limits.max_video_seconds}",
        )
    if info.frames > limits.max_video_frames:
        raise LimitExceededError(
            "max_video_frames",
            limits.max_video_frames,
            info.frames,
            f"video: {info.frames} frames, over limits.max_video_frames = {limits.max_video_frames}",
        )
    pixels = info.width * info.height
    if pixels > limits.max_video_pixels:
        raise LimitExceededError(
            "max_video_pixels",
            limits.max_video_pixels,
            pixels,
            f"video: frames of {info.width}×{info.height} = {pixels} pixels, over limits.max_video_pixels = "
            f"{limits.max_video_pixels}",
        )


def check_frame_count(frames: int, limits: Limits) -> None:
    if frames > limits.max_video_frames:
        raise LimitExceededError(
            "max_video_frames",
            limits.max_video_frames,
            frames,
            f"video: more than {limits.max_video_frames} frames, over limits.max_video_frames",
        )


def check_video_work(
    params: FaceDetailerParams,
    faces: Sequence[PlannedFace],
    limits: Limits,
    prompt_windows: Callable[[tuple[str, ...]], int] | None = None,
) -> None:
    """Every crop and frame as an image's (prompt tokens too, given ``prompt_windows``), then the
    video's total work units (hooks, retries and ControlNet counted as for images)."""
    per_crop = limits.model_copy(update={"max_work_units": float("inf")})
    # image_index is the frame: messages say "image k" = frame k
    check_planned_work(params, faces, per_crop, prompt_windows)
    total = sum(face_work_units(params, face.sample_size) for face in faces)
    if total > limits.max_video_work_units:
        raise LimitExceededError(
            "max_video_work_units",
            limits.max_video_work_units,
            round(total, 1),
            f"the video needs {total:.0f} work units (UNet steps × crop pixels / 512², summed over {len(faces)} "
            f"face crops: {face_work_factor(params):g} steps per face at 512² with its cycles, hooks, retries and "
            f"ControlNet), over limits.max_video_work_units = {limits.max_video_work_units}; lower steps, cycle, "
            "guide_size or max_size, or refine fewer tracks (pick_tracks, max_tracks)",
            (*work_fields(params), "pick_tracks", "max_tracks"),
        )
