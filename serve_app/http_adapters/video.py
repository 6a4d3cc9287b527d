"""Videos over HTTP and the handle API: ``POST /v1/detail/video`` and ``/v1/detail/video/stream``.

A multipart body: the file in a ``video`` field, FaceDetailer's parameters as for ``/v1/detail``
(a ``params`` JSON field and/or one field per parameter, or a ``workflow``), and the video options
of :class:`facedetailer.video_params.VideoParams` among them by name. The answer is the detailed
video file (``?container=mp4|mov|mkv``) with its facts in ``X-…`` headers, or everything as JSON
(``?format=json``, the file base64-encoded). The streaming variant sends ``progress`` events
(frames done, elapsed, ETA) and then the JSON ``result``; closing the connection cancels the work.

:class:`VideoRoutes` is mixed into the ingress deployment (its methods need the ingress' models,
limits and admission count); the orchestration is :mod:`serve_app.video`.
"""

import asyncio
import base64
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from deployments.inpainter import RefineJob
from facedetailer.params import FaceDetailerParams
from facedetailer.video_params import VideoParams, split_video_values
from serve_app.auth import DETAIL, Caller
from serve_app.config import Limits
from serve_app.http_adapters.encoding import error_body
from serve_app.http_adapters.error_handling import response_for_exception, stream_error
from serve_app.http_adapters.errors import RequestError, parse_params, validation_error
from serve_app.http_adapters.openapi import VIDEO_REQUEST_BODY, VIDEO_RESPONSES, VIDEO_STREAM_RESPONSES
from serve_app.http_adapters.request_reading import MULTIPART_OVERHEAD, capped, form_parameters
from serve_app.limits import MAX_WORKFLOW_BYTES, planned_work_units
from serve_app.streaming import HEARTBEAT_S, SSE_HEADERS, SSE_HEARTBEAT, SSE_MEDIA_TYPE, sse, with_progress
from serve_app.video.codec import CONTAINERS, VideoInputError
from serve_app.video.service import VideoResponse, detail_video_file

video_router = APIRouter()


async def read_video_request(request: Request, limits: Limits) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """The uploaded file's bytes, FaceDetailer's values and the video options (not yet validated).

    As ``/v1/detail``'s multipart body (:mod:`.request_reading`): the body's bytes capped as they
    arrive, every text field within the JSON bounds, a field given twice refused.
    """
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(415, "send multipart/form-data with the file in a field named 'video'")
    budget = limits.max_video_upload_bytes + MAX_WORKFLOW_BYTES + MULTIPART_OVERHEAD
    try:
        # the video + a workflow file; a text field may be as long as a workflow, each checked below
        form = await capped(request, budget).form(max_files=2, max_fields=100, max_part_size=MAX_WORKFLOW_BYTES)
    except RequestError:
        raise
    except Exception as error:  # the parser's message says what is malformed (no server detail in it)
        raise RequestError(400, f"malformed multipart body: {str(error)[:200]}") from error
    try:
        return await _form_contents(form, limits)
    finally:
        await form.close()  # the spooled upload


async def _form_contents(form: Any, limits: Limits) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    for key in form:
        if len(form.getlist(key)) > 1:
            raise RequestError.for_field(422, key, "given more than once")
    upload = form.get("video")
    if upload is None:
        raise RequestError.for_field(422, "video", "a file field named 'video' is required")
    if isinstance(upload, str):
        raise RequestError.for_field(422, "video", "must be a file upload, not a text field")
    data = await upload.read(limits.max_video_upload_bytes + 1)
    if len(data) > limits.max_video_upload_bytes:
        raise RequestError.for_field(
            413, "video", f"larger than limits.max_video_upload_bytes = {limits.max_video_upload_bytes} bytes"
        )
    face, video = split_video_values(await form_parameters(form, "video", limits))
    return data, face, video


def parse_video_params(values: dict[str, Any] | VideoParams | None) -> VideoParams:
    if isinstance(values, VideoParams):
        return values
    try:
        return VideoParams.model_validate(values or {})
    except ValidationError as error:
        raise validation_error(error) from error


def check_container(container: str) -> str:
    if container not in CONTAINERS:
        raise RequestError.for_field(422, "container", f"must be one of {', '.join(CONTAINERS)}, got {container!r}")
    return container


class FrameProgress:
    """``(frames done, frames in all)`` → a ``progress`` event with the elapsed time and an ETA."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (total - done) if done else None
        return {
            "event": "progress",
            "frames_done": done,
            "frames_total": total,
            "elapsed_s": round(elapsed, 3),
            "eta_s": None if eta is None else round(eta, 3),
        }


def video_json(response: VideoResponse, *, with_data: bool = True) -> dict[str, Any]:
    """Everything but the frames: the file (base64), its facts, the tracks and the flicker figure."""
    body: dict[str, Any] = {
        "container": response.container,
        "media_type": response.media_type,
        "video_codec": response.video_codec,
        "pixel_format": response.pixel_format,
        "audio_copied": response.audio_copied,
        "frames": response.frames,
        "width": response.width,
        "height": response.height,
        "average_rate": response.average_rate,
        "temporal": response.temporal,
        "faces_refined": response.faces_refined,
        "flicker": response.flicker,
        "segments": response.segments,
        "tracks": [dataclasses.asdict(track) for track in response.tracks],
        "timings": response.timings,
    }
    if with_data:
        body["video"] = base64.b64encode(response.data).decode("ascii")
    return body


def video_headers(response: VideoResponse) -> dict[str, str]:
    return {
        "X-Faces-Refined": str(response.faces_refined),
        "X-Tracks": str(sum(1 for track in response.tracks if track.selected)),
        "X-Flicker": f"{response.flicker:.4f}",
        "X-Video-Codec": response.video_codec,
        "X-Container": response.container,
        "X-Audio-Copied": "true" if response.audio_copied else "false",
        "X-Temporal": response.temporal,
        "Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in response.timings.items()),
        "Content-Disposition": f'attachment; filename="detailed.{response.container}"',
    }


class VideoRoutes:
    """The video routes and handle methods of the ingress (``FaceDetailerIngress`` inherits them).

    A video is judged as an image request is: the ingress' preflight (limits on the parameters,
    models, sampler, hooks, prompts) before any model work, the same errors in the one error shape.
    """

    limits: Limits
    wildcards: Any
    metrics: Any
    _inflight: int

    # ---- Python handle API -------------------------------------------------------------------
    async def detail_video(
        self,
        data: bytes,
        params: dict[str, Any] | FaceDetailerParams | None = None,
        video: dict[str, Any] | VideoParams | None = None,
        container: str = "mp4",
        on_frames_done: Callable[[int, int], None] | None = None,
        preflight: Any = None,
        caller: Caller | None = None,
    ) -> VideoResponse:
        """Detail a video file's bytes; ``params`` as for ``detail``, ``video`` the video options.

        ``params`` may also carry the video options by name (they are split off). ``caller``: the
        HTTP request's API key (its quotas — the video's planned crops and work units — and fair share).
        """
        from serve_app.ingress import pipeline_errors  # the ingress imports this module

        if not isinstance(data, bytes | bytearray | memoryview):
            raise RequestError.for_field(422, "video", f"must be the video file's bytes, got {type(data).__name__}")
        if isinstance(params, dict):
            params, carried = split_video_values(params)
            if video is None or isinstance(video, dict):
                video = {**carried, **(video or {})}
        resolved = parse_params(params)
        options = parse_video_params(video)
        check_container(container)
        checked = preflight or await self._preflight(resolved)  # type: ignore[attr-defined]
        stages = self._stages(checked, caller)  # type: ignore[attr-defined]
        auth = getattr(self, "auth", None)
        lease = auth.lease(caller) if auth is not None else None
        reserve = None
        if lease is not None:
            def reserve(faces: list[Any]) -> Any:
                return lease.reserve(crops=len(faces), work_units=planned_work_units(resolved, faces))
        async with pipeline_errors(self.limits, lease, stages.calls):
            try:
                response = await asyncio.wait_for(
                    detail_video_file(
                        bytes(data),
                        resolved,
                        options,
                        stages,
                        self.limits,
                        make_job=RefineJob,
                        settings=checked.settings,
                        container=container,  # type: ignore[arg-type]
                        has_sam=stages.sam is not None,
                        has_segm=stages.segm_detector is not None,
                        control=checked.control,
                        on_frames_done=on_frames_done,
                        wildcard_files=self.wildcards,
                        prompt_windows=checked.prompt_windows,
                        reserve=reserve,
                    ),
                    timeout=self.limits.request_timeout_s,
                )
            except VideoInputError as error:  # before the ValueError → 422 rule: 413/415 stay theirs
                raise RequestError.for_field(error.status_code, "video", str(error).removeprefix("video: ")) \
                    from error
        self.metrics.record_video(response)
        return response

    async def detail_video_with_progress(
        self,
        data: bytes,
        params: dict[str, Any] | None = None,
        video: dict[str, Any] | None = None,
        container: str = "mp4",
    ) -> AsyncIterator[dict[str, Any]]:
        """Streaming variant: ``progress`` events (frames done, ETA), then ``{"event": "result"}``."""
        async for event in with_progress(
            lambda on_done: self.detail_video(data, params, video, container, on_frames_done=on_done),
            event_of=FrameProgress(),
        ):
            yield event

    # ---- HTTP API ----------------------------------------------------------------------------
    @video_router.post(
        "/v1/detail/video",
        operation_id="detail_video",
        responses=VIDEO_RESPONSES,
        openapi_extra=VIDEO_REQUEST_BODY,
    )
    async def http_detail_video(
        self, request: Request, container: Literal["mp4", "mov", "mkv"] = "mp4",
        format: Literal["video", "json"] = "video", caller: Caller | None = Depends(DETAIL),
    ) -> Response:  # fmt: skip
        """Detail an uploaded video. Returns the video file, or with ``?format=json`` everything as JSON."""
        try:
            self._admit()  # type: ignore[attr-defined]
            try:
                data, values, options = await read_video_request(request, self.limits)
                response = await self.detail_video(data, values, options, container, caller=caller)
            finally:
                self._inflight -= 1
        except Exception as error:
            return response_for_exception(error)
        if format == "json":
            return JSONResponse(video_json(response))
        return Response(response.data, media_type=response.media_type, headers=video_headers(response))

    @video_router.post(
        "/v1/detail/video/stream",
        operation_id="detail_video_stream",
        responses=VIDEO_STREAM_RESPONSES,
        openapi_extra=VIDEO_REQUEST_BODY,
    )
    async def http_detail_video_stream(
        self, request: Request, container: Literal["mp4", "mov", "mkv"] = "mp4",
        caller: Caller | None = Depends(DETAIL),
    ) -> Response:  # fmt: skip
        """``/v1/detail/video``'s inputs; Server-Sent Events: ``progress`` as frames finish, then ``result``.

        Every error knowable before detection (body, parameters and their limits, models, sampler,
        hooks, prompts) is a plain JSON 4xx before the stream starts; later ones (the video's
        container, its limits, the work limits) an ``error`` event. Closing the connection cancels
        the work.
        """
        try:
            self._admit()  # type: ignore[attr-defined]
            try:
                data, values, options = await read_video_request(request, self.limits)
                params = parse_params(values)
                video = parse_video_params(options)
                preflight = await self._preflight(params)  # type: ignore[attr-defined]
            except BaseException:
                self._inflight -= 1
                raise
        except Exception as error:
            return response_for_exception(error)
        events = self._video_event_stream(data, params, video, container, preflight, caller)
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)

    async def _video_event_stream(
        self, data: bytes, params: FaceDetailerParams, video: VideoParams, container: str, preflight: Any,
        caller: Caller | None = None,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        try:
            async for event in with_progress(
                lambda on_done: self.detail_video(
                    data, params, video, container, on_frames_done=on_done, preflight=preflight, caller=caller
                ),
                heartbeat_s=HEARTBEAT_S,
                event_of=FrameProgress(),
            ):
                if event["event"] == "heartbeat":
                    yield SSE_HEARTBEAT
                elif event["event"] == "progress":
                    yield sse("progress", event)
                else:
                    yield sse("result", video_json(event["result"]))
        except Exception as error:
            yield sse("error", error_body(stream_error(error, "/v1/detail/video/stream")))
        finally:
            self._inflight -= 1
