"""A video file in, a detailed video file out: decode → limits → :func:`detail_video` → encode.

Decoding and encoding are blocking FFmpeg work: they run in a worker thread so the ingress keeps
serving other requests meanwhile. Nothing here imports Ray; the ingress (handles) and the
benchmark (in-process models) hand in their stages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from facedetailer.params import FaceDetailerParams
from facedetailer.video_params import VideoParams
from serve_app.config import Limits
from serve_app.limits import LimitExceededError, check_planned_names
from serve_app.pipeline import ControlChoice, PlannedFace, Stages
from serve_app.video.codec import (
    MEDIA_TYPES,
    Container,
    VideoInputError,
    decode_video,
    encode_video,
    probe_video,
)
from serve_app.video.limits import check_video_info, check_video_work
from serve_app.video.pipeline import OnFramesDone, TrackReport, VideoDetailResult, detail_video


@dataclass
class VideoResponse:
    """The detailed video file and what was done (the handle API's and HTTP's answer)."""

    data: bytes
    container: str
    media_type: str
    video_codec: str
    pixel_format: str
    audio_copied: bool
    frames: int
    width: int
    height: int
    average_rate: str | None
    temporal: str
    tracks: list[TrackReport]
    faces_refined: int
    flicker: float
    segments: int
    timings: dict[str, float] = field(default_factory=dict)
    result: VideoDetailResult | None = None  # the frames themselves (in-process callers only)


async def detail_video_file(
    data: bytes,
    params: FaceDetailerParams,
    video: VideoParams,
    stages: Stages,
    limits: Limits,
    *,
    make_job: Callable[..., Any],
    settings: Any,
    container: Container = "mp4",
    has_sam: bool = False,
    has_segm: bool = False,
    control: ControlChoice | None = None,
    on_frames_done: OnFramesDone | None = None,
    wildcard_files: Any = None,
    keep_result: bool = False,
    prompt_windows: Callable[[tuple[str, ...]], int] | None = None,
    reserve: Callable[[list[PlannedFace]], Awaitable[None]] | None = None,
) -> VideoResponse:
    """Detail ``data`` (a video file's bytes); a limit exceeded is a :class:`LimitExceededError`.

    ``prompt_windows`` counts a prompt's CLIP windows (the ingress' preflight): each face's prompt
    tokens are then checked after detection, as for images. ``reserve``: the caller's quota for the
    planned faces (crops and work units), taken after the limits pass and before any refinement.
    """
    started = time.perf_counter()
    if len(data) > limits.max_video_upload_bytes:
        raise VideoInputError(
            f"video: {len(data)} bytes, over limits.max_video_upload_bytes = {limits.max_video_upload_bytes}",
            status_code=413,
        )
    info = await asyncio.to_thread(probe_video, data)
    check_video_info(info, limits)
    try:
        decoded = await asyncio.to_thread(decode_video, data, max_frames=limits.max_video_frames)
    except VideoInputError as error:
        if error.limit is not None:
            raise LimitExceededError(error.limit, limits.max_video_frames, limits.max_video_frames + 1, str(error)) \
                from error
        raise
    decode_s = time.perf_counter() - started

    def check_work(faces: list[PlannedFace]) -> Awaitable[None] | None:
        check_video_work(params, faces, limits, prompt_windows)
        check_planned_names(faces)
        return reserve(faces) if reserve is not None else None

    result = await detail_video(
        decoded.frames,
        params,
        video,
        stages,
        make_job=make_job,
        settings=settings,
        has_sam=has_sam,
        has_segm=has_segm,
        control=control,
        parallel_segments=limits.video_parallel_segments,
        check_work=check_work,
        on_frames_done=on_frames_done,
        wildcard_files=wildcard_files,
    )
    encode_start = time.perf_counter()
    encoded = await asyncio.to_thread(
        encode_video, result.frames, decoded.pts, decoded.info, audio_source=data, container=container, crf=video.crf
    )
    timings = {"decode": decode_s, **result.timings, "encode": time.perf_counter() - encode_start}
    timings["total"] = time.perf_counter() - started
    assert encoded.data is not None
    return VideoResponse(
        data=encoded.data,
        container=encoded.container,
        media_type=MEDIA_TYPES[encoded.container],
        video_codec=encoded.video_codec,
        pixel_format=encoded.pixel_format,
        audio_copied=encoded.audio_copied,
        frames=encoded.frames,
        width=decoded.info.width,
        height=decoded.info.height,
        average_rate=str(decoded.info.average_rate) if decoded.info.average_rate else None,
        temporal=result.temporal,
        tracks=result.tracks,
        faces_refined=sum(result.faces_refined),
        flicker=result.flicker,
        segments=result.segments,
        timings=timings,
        result=result if keep_result else None,
    )
