"""The ingress deployment: FaceDetailer's cycle and blend over the model deployments, and its HTTP API.

It holds no model. The image goes to the detector (and SAM) once per image; only upscaled crops
and their masks go to the inpainter. (No ``from __future__ import annotations`` in this module:
FastAPI must resolve the route signatures at runtime.)
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle

from deployments.inpainter import RefineJob, RefineResult, SamplingSettings
from deployments.inpainter_engine import EngineBusyError
from deployments.inpainter_hooks import check_cycle_plan
from deployments.step_progress import StepEvent
from facedetailer.params import FaceDetailerParams
from facedetailer.prompts import face_conditioning
from facedetailer.safe_paths import UnsafeNameError, check_name
from facedetailer.sam_prompts import SamPrompt
from facedetailer.segs import Detection
from facedetailer.widgets import widget_specs
from facedetailer.wildcards import FacePrompt
from serve_app.auth import ADMIN, DETAIL, AuthGate, Caller, QuotaLease, install_auth
from serve_app.config import Limits
from serve_app.http_adapters.encoding import error_body, public_info, result_to_json
from serve_app.http_adapters.error_handling import (
    install_error_handling,
    request_error,
    response_for_exception,
    stream_error,
)
from serve_app.http_adapters.errors import RequestError, parse_params, unsafe_name_error, validation_error
from serve_app.http_adapters.openapi import (
    DETAIL_REQUEST_BODY,
    DETAIL_RESPONSES,
    HEALTH_RESPONSES,
    INFO_RESPONSES,
    STATS_RESPONSES,
    STREAM_RESPONSES,
    install_openapi,
)
from serve_app.http_adapters.request_reading import read_detail_request
from serve_app.http_adapters.video import VideoRoutes, video_router
from serve_app.images import ImageInputError, as_uint8_image, decode_base64_image, encode_png
from serve_app.limits import (
    LimitExceededError,
    check_planned_names,
    check_planned_work,
    check_prompt_tokens,
    check_request,
    limited_widgets,
    planned_work_units,
)
from serve_app.model_calls import ModelCalls, ReplicaLostError
from serve_app.model_choice import ModelChoice, ModelChoiceError, NamedModels, SelectedModels
from serve_app.pipeline import (
    ControlChoice,
    DetailResult,
    PipelineInputError,
    PlannedFace,
    SegmentReport,
    StepListener,
    check_hooks,
    detail_batch,
    resolve_control,
)
from serve_app.progress import RequestProgress, StreamOptions
from serve_app.prompt_tokens import PromptTokenCounter, PromptWindows
from serve_app.streaming import HEARTBEAT_S, SSE_HEADERS, SSE_HEARTBEAT, SSE_MEDIA_TYPE, progress_events, sse
from serve_app.web import web_router
from serve_app.wildcard_files import WildcardFolder
from serve_app.workflow_api import workflow_router

logger = logging.getLogger("ray.serve")

http_app = FastAPI(
    title="facedetailer-serve",
    version="0.1.0",
    description=(
        "ComfyUI Impact Pack's FaceDetailer as a service: every face found, refined by a diffusion "
        "inpainter at a higher resolution, and blended back. Parameters use the node's names and defaults."
    ),
)
http_app.include_router(web_router)  # the web page at GET /
http_app.include_router(workflow_router)  # POST /v1/workflow/import
http_app.include_router(video_router)  # POST /v1/detail/video(/stream): VideoRoutes' methods
install_error_handling(http_app)  # request ids, and one error shape on every route
install_openapi(http_app)  # the parameter models the documented bodies refer to
install_auth(http_app)  # API keys when the config has `auth` (serve_app/auth/); documents them in the schema


async def _named_info(handles: dict[str, DeploymentHandle], calls: ModelCalls) -> dict[str, Any]:
    """``{name: info}`` of every configured model of one kind (the request names them)."""
    return {name: await _ask(calls, name, handle, "info") for name, handle in handles.items()}


async def _ask(calls: ModelCalls, name: str, handle: DeploymentHandle | None, method: str) -> Any:
    """``handle.<method>()`` with no arguments (None without a handle), retried if its replica dies."""
    if handle is None:
        return None
    return await calls.call(name, getattr(handle, method))


# A model call that cannot be served now: its replica lost beyond the retries (serve_app/model_calls.py),
# the deployment failed or overloaded. The caller may retry (503 with Retry-After).
MODEL_UNAVAILABLE: tuple[type[BaseException], ...] = (
    ReplicaLostError,
    RayActorError,
    ActorUnavailableError,
    BackPressureError,
    DeploymentUnavailableError,
    RequestCancelledError,
)


class ServiceMetrics:
    """Prometheus metrics (exported by Ray's metrics agent, names prefixed ``ray_``)."""

    STAGE_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

    def __init__(self) -> None:
        self.faces_detected = metrics.Counter(
            "facedetailer_faces_detected", description="Faces found by the detector (after drop_size)."
        )
        self.faces_refined = metrics.Counter(
            "facedetailer_faces_refined", description="Faces refined by the inpainter and pasted back."
        )
        self.images = metrics.Counter("facedetailer_images", description="Images detailed.")
        self.videos = metrics.Counter("facedetailer_videos", description="Videos detailed.")
        self.video_frames = metrics.Counter("facedetailer_video_frames", description="Frames of the videos detailed.")
        self.stage_latency = metrics.Histogram(
            "facedetailer_stage_latency_s",
            description="Seconds spent per pipeline stage per request (detect, sam, inpaint, blend, ...).",
            boundaries=self.STAGE_BOUNDARIES,
            tag_keys=("stage",),
        )

        self.model_call_retries = metrics.Counter(
            "facedetailer_model_call_retries",
            description="Model calls sent again because their replica died (serve_app/model_calls.py).",
            tag_keys=("model",),
        )

    def count_retry(self, deployment: str) -> None:
        self.model_call_retries.inc(tags={"model": deployment})

    def record(self, result: DetailResult) -> None:
        detected = sum(len(item.segments) for item in result.per_image)
        refined = sum(len(item.cropped_refined) for item in result.per_image)
        if detected:
            self.faces_detected.inc(detected)
        if refined:
            self.faces_refined.inc(refined)
        self.images.inc(len(result.per_image))
        for stage, seconds in result.timings.items():
            self.stage_latency.observe(seconds, tags={"stage": stage})

    def record_video(self, response: Any) -> None:
        """A detailed video (``serve_app.video.service.VideoResponse``): its faces count with the
        images', its stages as ``video_<stage>``."""
        if response.faces_refined:
            self.faces_refined.inc(response.faces_refined)
        self.videos.inc()
        self.video_frames.inc(response.frames)
        for stage, seconds in response.timings.items():
            self.stage_latency.observe(seconds, tags={"stage": f"video_{stage}"})


class HandleStages:
    """The pipeline's stages, each a call to a model deployment, retried on a live replica if its replica dies."""

    def __init__(
        self,
        detector: DeploymentHandle,
        inpainter: DeploymentHandle,
        sam: DeploymentHandle | None,
        segm_detector: DeploymentHandle | None,
        checkpoint: str | None = None,
        tenant: tuple[str, float] = ("", 1.0),
        calls: ModelCalls | None = None,
        preview_every: int = 0,
    ) -> None:
        self.detector, self.inpainter, self.sam, self.segm_detector = detector, inpainter, sam, segm_detector
        self.checkpoint = checkpoint
        self.calls = calls or ModelCalls()
        # the inpainter's fair queue: an API key's id and weight (passed only when there is a key)
        self.share = {"tenant": tenant[0], "weight": tenant[1]} if tenant[0] else {}
        self.preview_every = preview_every  # step previews, when a caller follows the steps

    async def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        return await self.calls.call("detector", self.detector.detect, image, threshold)

    async def detect_segm(self, image: np.ndarray, threshold: float) -> list[Detection]:
        assert self.segm_detector is not None
        return await self.calls.call("segm detector", self.segm_detector.detect, image, threshold)

    async def segment(self, image: np.ndarray, prompts: Sequence[SamPrompt]) -> list[Any]:
        assert self.sam is not None
        return await self.calls.call("SAM", self.sam.predict, image, list(prompts))

    async def refine(
        self,
        jobs: Sequence[RefineJob],
        settings: SamplingSettings,
        on_progress: Callable[[StepEvent], None] | None = None,
    ) -> RefineResult:
        # model multiplexing: routed to a replica that has the checkpoint loaded, if any
        inpainter = self.inpainter
        where: tuple[str, ...] = ()
        if self.checkpoint is not None:
            inpainter, where = inpainter.options(multiplexed_model_id=self.checkpoint), (self.checkpoint,)
        if on_progress is None:  # the plain call: nobody follows the steps, nothing is reported
            return await self.calls.call("inpainter", inpainter.refine, list(jobs), settings, *where, **self.share)
        # a streaming call: the replica sends the crops' steps as they happen, then the result
        results: list[RefineResult] = []

        def on_item(item: list[StepEvent] | RefineResult) -> None:
            if isinstance(item, list):
                for event in item:
                    on_progress(event)
            else:
                results.append(item)

        await self.calls.stream(
            "inpainter",
            inpainter.options(stream=True).refine_stream,
            on_item,
            list(jobs),
            settings,
            *where,
            preview_every=self.preview_every,
            **self.share,
        )
        if not results:
            raise RuntimeError("the inpainter's step stream ended without a result")
        return results[-1]


def stream_options(values: dict[str, Any]) -> StreamOptions:
    """A stream request's own fields (``progress``, ``preview_every``), taken out of its values."""
    try:
        return StreamOptions.model_validate(StreamOptions.pop_from(values))
    except ValidationError as error:
        raise validation_error(error) from error


@contextlib.asynccontextmanager
async def pipeline_errors(
    limits: Limits, lease: QuotaLease | None = None, calls: ModelCalls | None = None
) -> AsyncIterator[None]:
    """What a running request may raise, as the HTTP error it means (4xx for the caller's input).

    ``lease``: the caller's quota lease, released on every exit and refunded when the request ends
    in a 503 (no work done, the caller is told to retry); ``calls``: the request's model calls, to
    tell a timeout caused by lost replicas (503, retry) from a slow request (504).
    """
    try:
        yield
    except LimitExceededError as error:
        raise RequestError(422, str(error), error.details()) from error
    except UnsafeNameError as error:  # a LoRA or wildcard name that would leave its folder
        raise unsafe_name_error(error) from error
    except PipelineInputError as error:
        raise RequestError.for_message(422, str(error)) from error
    except EngineBusyError as error:  # the inpainter's queue is full: retry later
        if lease is not None:
            lease.refund = True  # no work done for this request: its units go back to the key
        raise RequestError(503, str(error)) from error
    except TimeoutError as error:
        # a replica died and none took its call in time, or none runs: not the request's fault
        gone = (calls.lost() or await calls.unserved()) if calls is not None else None
        if gone:
            message = f"no live {', '.join(gone)} replica within the request's {limits.request_timeout_s} s"
            raise RequestError(503, message + "; retry") from error
        raise RequestError(504, f"request took longer than {limits.request_timeout_s} s") from error
    except ValueError as error:  # e.g. the inpainter rejecting a sampler/scheduler combination
        raise RequestError.for_message(422, str(error)) from error
    except MODEL_UNAVAILABLE as error:
        # a model replica died or is overloaded mid-request: the caller may retry
        logger.warning("model deployment unavailable: %s", error)
        if lease is not None:
            lease.refund = True
        raise RequestError(503, f"a model deployment is unavailable ({type(error).__name__}); retry") from error
    finally:
        if lease is not None:
            lease.release()  # every exit: success, error, timeout, the client gone (cancellation)


def sampling_settings(params: FaceDetailerParams) -> SamplingSettings:
    """The inpainter's shared settings: the request fields of the same names (steps, cfg, …)."""
    return SamplingSettings.model_validate(params.model_dump(include=set(SamplingSettings.model_fields)))


@dataclass(frozen=True)
class Preflight:
    """A request judged before any model work: every error knowable before detection was raised."""

    models: SelectedModels[DeploymentHandle]
    checkpoint: str | None
    settings: SamplingSettings
    control: ControlChoice | None
    prompt_windows: PromptWindows


@serve.deployment(name="FaceDetailerIngress")
@serve.ingress(http_app)
class FaceDetailerIngress(VideoRoutes):
    """Runs FaceDetailer by calling the Detector, Sam and Inpainter deployments."""

    def __init__(
        self,
        detector: DeploymentHandle | dict[str, DeploymentHandle],
        inpainter: DeploymentHandle,
        sam: DeploymentHandle | dict[str, DeploymentHandle] | None = None,
        segm_detector: DeploymentHandle | dict[str, DeploymentHandle] | None = None,
        limits: dict[str, Any] | None = None,
        wildcards_dir: str | None = None,
        controlnets: dict[str, str] | None = None,
        checkpoints: list[str] | None = None,
        auth: dict[str, Any] | None = None,
        text_encoder: DeploymentHandle | None = None,
    ) -> None:
        # each model kind: one handle, or several by name (serve_app/model_choice.py)
        self.models = ModelChoice.of(detector, segm_detector, sam)
        self.stages = HandleStages(
            self.models.detectors.default, inpainter, self.models.sam_models.default, self.models.segm_detectors.default
        )
        self.limits = Limits.model_validate(limits or {})
        self.wildcards = WildcardFolder(wildcards_dir) if wildcards_dir else None
        self.controlnets = dict(controlnets or {})  # {name: preprocessor}; the inpainter loads them
        # the inpainter's checkpoints by name (a request's ``model``; the first is the default)
        # (an inpainter deployment bound without them takes no model argument: nothing is routed)
        self.checkpoints = NamedModels.of("model", {name: name for name in checkpoints or ["default"]})
        self._route_checkpoints = checkpoints is not None
        self.text_encoder = text_encoder  # the SD3/Flux text encoders' deployment, if any: its counters in stats
        self._supported: tuple[list[str], list[str]] | None = None
        self.metrics = ServiceMetrics()
        self._inflight = 0
        # API keys, scopes, quotas (None: open, as without `auth`); read by serve_app/auth/http.py
        self.auth = AuthGate.of(auth, self.limits.request_timeout_s)
        self.prompt_tokens = PromptTokenCounter(self._fetch_tokenizers)

    # ---- Python handle API -------------------------------------------------------------------
    async def detail(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        params: dict[str, Any] | FaceDetailerParams | None = None,
        on_face: Callable[[SegmentReport], None] | None = None,
        batch_faces: bool = True,
        progress: StepListener | None = None,
        caller: Caller | None = None,
    ) -> DetailResult:
        """Detail one image [H, W, 3] or a batch ([B, H, W, 3] or a list); image k uses seed + k.

        ``batch_faces=False`` refines one face per inpainter call (the reference's way; for comparison).
        ``progress`` follows the sampler's steps (``detail_with_progress``); without it the
        inpainter reports nothing. ``caller``: the HTTP request's API key (its quotas and fair share;
        handle callers have none).
        """
        batch = [images] if isinstance(images, np.ndarray) and images.ndim == 3 else list(images)
        if not batch:
            raise RequestError(422, "images: at least one image is required")
        if len(batch) > self.limits.max_batch_images:
            raise RequestError(413, f"images: {len(batch)} images exceeds the limit of {self.limits.max_batch_images}")
        try:
            arrays = [as_uint8_image(image, f"images[{k}]") for k, image in enumerate(batch)]
        except ImageInputError as error:
            raise RequestError.for_message(error.status_code, str(error)) from error
        for k, array in enumerate(arrays):
            if array.shape[0] * array.shape[1] > self.limits.max_image_pixels:
                raise RequestError(413, f"images[{k}]: exceeds the limit of {self.limits.max_image_pixels} pixels")
        resolved = parse_params(params)
        return await self._run(arrays, resolved, on_face, batch_faces, progress=progress, caller=caller)

    async def detail_with_progress(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        params: dict[str, Any] | None = None,
        *,
        progress: bool = True,
        preview_every: int = 0,
    ) -> AsyncIterator[dict[str, Any]]:
        """Streaming variant for progress bars (``handle.options(stream=True)``): the events of
        ``/v1/detail/stream`` (``plan``, ``progress`` per sampler step with a latent preview every
        ``preview_every`` steps, ``face`` per finished face; see :mod:`serve_app.progress`), then
        ``{"event": "result", "result": DetailResult}``. ``progress=False``: face events only.
        """
        try:
            options = StreamOptions(progress=progress, preview_every=preview_every)
        except ValidationError as error:
            raise validation_error(error) from error
        async for event in progress_events(lambda listener: self._followed(images, params, listener, options), options):
            yield event

    def _followed(
        self, images: Any, params: Any, listener: RequestProgress, options: StreamOptions
    ) -> Awaitable[DetailResult]:
        """``detail`` reporting to ``listener``: faces always, sampler steps when ``options.progress``."""
        return self.detail(images, params, on_face=listener.face, progress=listener if options.progress else None)

    async def info(self) -> dict[str, Any]:
        samplers, schedulers = await self._supported_names()
        calls = self._model_calls()
        inpainter_info = await _ask(calls, "inpainter", self.stages.inpainter, "info")
        return {
            "models": {
                "detector": await _ask(calls, "detector", self.stages.detector, "info"),
                "segm_detector": await _ask(calls, "segm detector", self.stages.segm_detector, "info"),
                "sam": await _ask(calls, "SAM", self.stages.sam, "info"),
                "inpainter": inpainter_info,
                "text_encoder": await self.text_encoder.info.remote() if self.text_encoder else None,
            },
            "detectors": await _named_info(self.models.detectors.models, calls),
            "segm_detectors": await _named_info(self.models.segm_detectors.models, calls),
            "sam_models": await _named_info(self.models.sam_models.models, calls),
            "controlnets": inpainter_info.get("controlnets", {}),
            "checkpoints": await self._checkpoint_descriptions(),
            "samplers": samplers,
            "schedulers": schedulers,
            "limits": self.limits.model_dump(),
            "wildcards": sorted(self.wildcards) if self.wildcards is not None else [],
            "defaults": FaceDetailerParams().model_dump(),
            "parameters": limited_widgets(
                widget_specs(
                    samplers,
                    schedulers,
                    model_names={
                        "bbox_detector": self.models.detectors.names,
                        "segm_detector": self.models.segm_detectors.names,
                        "sam_model": self.models.sam_models.names,
                        "model": self.checkpoints.names,
                    },
                ),
                self.limits,
            ),
        }

    async def _checkpoint_descriptions(self) -> dict[str, Any]:
        """The checkpoints by name (the first is the default), each with its family, model sampling and dtype."""
        try:
            described = await self.stages.inpainter.checkpoint_descriptions.remote()
        except Exception as error:  # an inpainter deployment without descriptions: the names alone
            logger.debug("checkpoint descriptions unavailable: %s", error)
            described = {}
        return {name: described.get(name, {}) for name in self.checkpoints.names}

    async def stats(self) -> dict[str, Any]:
        """Serving statistics: the inpainter engine's, summed over its replicas (``GET /v1/stats``),
        the prompt cache's, and with API keys each key's quota usage."""
        stats = {"inpainter": await _ask(self._model_calls(), "inpainter", self.stages.inpainter, "stats")}
        if self.text_encoder is not None:  # the prompt cache's hits and misses
            stats["text_encoder"] = await self.text_encoder.stats.remote()
        if self.auth is not None:
            stats["auth"] = await self.auth.usage()
        return stats

    async def _supported_names(self) -> tuple[list[str], list[str]]:
        if self._supported is None:
            calls = self._model_calls()
            samplers = await _ask(calls, "inpainter", self.stages.inpainter, "supported_samplers")
            schedulers = await _ask(calls, "inpainter", self.stages.inpainter, "supported_schedulers")
            self._supported = (samplers, schedulers)
        return self._supported

    async def _validate_sampling(self, params: FaceDetailerParams) -> None:
        samplers, schedulers = await self._supported_names()
        if params.sampler_name not in samplers:
            raise RequestError.for_field(
                422, "sampler_name", f"unsupported {params.sampler_name!r}; supported: {', '.join(samplers)}"
            )
        if params.scheduler not in schedulers:
            raise RequestError.for_field(
                422, "scheduler", f"unsupported {params.scheduler!r}; supported: {', '.join(schedulers)}"
            )
        if params.use_sam and self.stages.sam is None:
            raise RequestError.for_field(422, "use_sam", "this service has no SAM deployment configured")
        if params.use_segm and self.stages.segm_detector is None:
            raise RequestError.for_field(422, "use_segm", "this service has no segm detector deployment configured")

    async def _preflight(self, params: FaceDetailerParams) -> Preflight:
        """Every check that needs no detection, in one place: the stream answers these as a 4xx.

        Limits on the parameters (steps, hook steps, prompt characters and tokens), the models,
        sampler and scheduler named, the hooks' cycles, the ControlNet, the prompts' syntax and
        the LoRA names in positive/negative. What depends on the faces found (work units, each
        face's prompt after its wildcard) is checked after detection, before the inpainter.
        """
        try:
            check_request(params, self.limits)
            chosen = self.models.select(params)
            checkpoint = self.checkpoints.resolve(params.model)
        except (LimitExceededError, ModelChoiceError) as error:
            raise self._client_error(error) from error
        await self._validate_sampling(params)
        settings = sampling_settings(params)
        control = self._control(params)
        try:
            check_cycle_plan(settings)  # the sampling hooks' cycles and unsampler, before any model work
            check_hooks(params)
            base = face_conditioning(params.positive, params.negative, FacePrompt(False, False, None, None, False))
            for lora in base.loras:
                check_name(lora.name, "LoRA")
            counted = bool(params.positive.strip() or (params.negative or "").strip() or params.wildcard.strip())
            windows = await self.prompt_tokens.windows(checkpoint or "default", needed=counted)
            check_prompt_tokens("positive", windows(base.positive), self.limits)
            if base.negative is not None:  # negative: null (basic guidance) has no negative text
                check_prompt_tokens("negative", windows(base.negative), self.limits)
        except ValueError as error:  # a limit, a prompt or hook the service cannot run, an unsafe name
            raise self._client_error(error) from error
        return Preflight(chosen, checkpoint, settings, control, windows)

    @staticmethod
    def _client_error(error: Exception) -> RequestError:
        """A client error raised by a check as the service's :class:`RequestError` (422 by default)."""
        return request_error(error) or RequestError.for_message(422, str(error))

    async def _fetch_tokenizers(self, checkpoint: str) -> Any:
        """The checkpoint's tokenizers, from an inpainter replica that has it (``prompt_tokens``)."""
        if not self._route_checkpoints:
            return await _ask(self._model_calls(), "inpainter", self.stages.inpainter, "prompt_tokenizers")
        inpainter = self.stages.inpainter.options(multiplexed_model_id=checkpoint)
        return await self._model_calls().call("inpainter", inpainter.prompt_tokenizers, checkpoint)

    async def _run(
        self,
        images: list[np.ndarray],
        params: FaceDetailerParams,
        on_face: Callable[[SegmentReport], None] | None = None,
        batch_faces: bool = True,
        progress: StepListener | None = None,
        caller: Caller | None = None,
        preflight: Preflight | None = None,
    ) -> DetailResult:
        checked = preflight or await self._preflight(params)
        stages = self._stages(checked, caller, preview_every=getattr(progress, "preview_every", 0))
        lease = self.auth.lease(caller) if self.auth is not None else None
        async with pipeline_errors(self.limits, lease, stages.calls):
            result = await asyncio.wait_for(
                detail_batch(
                    images,
                    params,
                    stages,
                    make_job=RefineJob,
                    settings=checked.settings,
                    has_sam=stages.sam is not None,
                    has_segm=stages.segm_detector is not None,
                    on_face=on_face,
                    batch_faces=batch_faces,
                    check_work=lambda faces: self._check_planned(params, faces, checked.prompt_windows, lease),
                    wildcard_files=self.wildcards,
                    control=checked.control,
                    progress=progress,
                ),
                timeout=self.limits.request_timeout_s,
            )
        self.metrics.record(result)
        return result

    def _model_calls(self) -> ModelCalls:
        """A request's model calls: retried on a live replica when theirs dies, within its deadline."""
        return ModelCalls.within(
            self.limits.request_timeout_s, self.limits.replica_loss_retries, on_retry=self.metrics.count_retry
        )

    def _stages(self, checked: Preflight, caller: Caller | None = None, preview_every: int = 0) -> HandleStages:
        """The stages a request's chosen models answer on (its checkpoint routed when there are several),
        shared fairly under the caller's key, each call retried on a live replica if its replica dies;
        ``preview_every``: step previews when a caller follows the sampler's steps."""
        chosen = checked.models
        return HandleStages(
            chosen.detector,
            self.stages.inpainter,
            chosen.sam,
            chosen.segm_detector,
            checked.checkpoint if self._route_checkpoints else None,
            self.auth.tenant(caller) if self.auth is not None else ("", 1.0),
            self._model_calls(),
            preview_every=preview_every,
        )

    def _check_planned(
        self,
        params: FaceDetailerParams,
        faces: list[PlannedFace],
        prompt_windows: PromptWindows,
        lease: QuotaLease | None = None,
    ) -> Awaitable[None] | None:
        """Before any inpainter work: work and prompt limits, the file names the faces ask for, the key's quotas."""
        check_planned_work(params, faces, self.limits, prompt_windows)
        check_planned_names(faces)
        if lease is None:
            return None
        return lease.reserve(crops=len(faces), work_units=planned_work_units(params, faces))

    def _control(self, params: FaceDetailerParams) -> ControlChoice | None:
        """The request's ControlNet checked against the configured ones; its control image decoded."""
        try:
            return resolve_control(
                params,
                self.controlnets,
                lambda text: decode_base64_image(text, self.limits, "controlnet.control_image"),
            )
        except PipelineInputError as error:
            raise RequestError.for_message(422, str(error)) from error
        except ImageInputError as error:
            raise RequestError.for_message(error.status_code, str(error)) from error

    # ---- HTTP API ----------------------------------------------------------------------------
    @http_app.get("/healthz", operation_id="healthz", responses=HEALTH_RESPONSES)
    async def healthz(self) -> JSONResponse:
        """Ready when every model deployment answers its health probe."""
        checks: dict[str, str] = {}
        handles = {**self.models.labelled(), "inpainter": self.stages.inpainter}
        for name, handle in handles.items():
            if handle is None:
                continue
            try:
                await asyncio.wait_for(handle.check_health.remote(), timeout=10)
                checks[name] = "ok"
            except Exception as error:  # a replica down or failing its probe: its kind here, the text in the log
                logger.warning("health probe of %s failed: %s: %s", name, type(error).__name__, error)
                checks[name] = f"unhealthy: {type(error).__name__}"
        healthy = all(value == "ok" for value in checks.values())
        status = {"status": "ok" if healthy else "unhealthy", "deployments": checks}
        return JSONResponse(status, 200 if healthy else 503)

    @http_app.get("/v1/stats", operation_id="stats", responses=STATS_RESPONSES)
    async def http_stats(self, caller: Caller | None = Depends(ADMIN)) -> JSONResponse:
        """UNet batch sizes, queue wait and active crops of the inpainter engine, over all replicas;
        with API keys, each key's quota usage (the ``admin`` scope)."""
        try:
            return JSONResponse(await self.stats())
        except MODEL_UNAVAILABLE as error:
            raise RequestError(503, f"the inpainter is unavailable ({type(error).__name__}); retry") from error

    @http_app.get("/v1/info", operation_id="info", responses=INFO_RESPONSES)
    async def http_info(self, request: Request) -> JSONResponse:
        """Models (configured names and references), samplers, schedulers, limits and parameter defaults.

        Public. ``auth`` says whether keys are required and, for a valid key sent, the key's scopes and quotas.
        """
        try:
            info = public_info(await self.info())
        except MODEL_UNAVAILABLE as error:
            raise RequestError(503, f"a model deployment is unavailable ({type(error).__name__}); retry") from error
        if self.auth is not None:
            caller = self.auth.identify(request.headers.get("authorization"))
            info["auth"] = {"required": True, "scheme": "Bearer", "key": caller.public() if caller else None}
        return JSONResponse(info)

    @http_app.post("/v1/detail", operation_id="detail", responses=DETAIL_RESPONSES, openapi_extra=DETAIL_REQUEST_BODY)
    async def http_detail(
        self, request: Request, format: Literal["png", "json"] = "png", caller: Caller | None = Depends(DETAIL)
    ) -> Response:
        """Detail an uploaded image. Returns the PNG, or with ``?format=json`` every output as JSON."""
        try:
            started = time.perf_counter()
            self._admit()
            try:
                images, values = await read_detail_request(request, self.limits)
                decoded = time.perf_counter()
                result = await self.detail(images, values, caller=caller)
            finally:
                self._inflight -= 1
        except Exception as error:
            return response_for_exception(error)
        result.timings["decode"] = decoded - started
        encode_start = time.perf_counter()
        if format == "json":
            body = result_to_json(result)
            body["timings"]["encode"] = time.perf_counter() - encode_start
            body["timings"]["total"] = time.perf_counter() - started
            return JSONResponse(body)
        png = encode_png(result.images[0])
        result.timings["encode"] = time.perf_counter() - encode_start
        result.timings["total"] = time.perf_counter() - started
        headers = {
            "X-Faces-Refined": str(sum(len(r.cropped_refined) for r in result.per_image)),
            "Server-Timing": ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in result.timings.items()),
        }
        return Response(png, media_type="image/png", headers=headers)

    @http_app.post(
        "/v1/detail/stream", operation_id="detail_stream", responses=STREAM_RESPONSES, openapi_extra=DETAIL_REQUEST_BODY
    )
    async def http_detail_stream(self, request: Request, caller: Caller | None = Depends(DETAIL)) -> Response:
        """``/v1/detail``'s inputs; Server-Sent Events: ``face`` per finished face, then ``result``.

        ``result`` carries what ``?format=json`` returns. Every error knowable before detection
        (body, images, parameters, limits on them, models, sampler, hooks, prompts) is a plain
        JSON 4xx before the stream starts; a failure after it starts (e.g. a work limit, which
        depends on the faces found) is an ``error`` event.
        """
        started = time.perf_counter()
        try:
            self._admit()
            try:
                images, values = await read_detail_request(request, self.limits)
                decode_s = time.perf_counter() - started
                options = stream_options(values)  # the stream's own fields, out of the values
                params = parse_params(values)
                preflight = await self._preflight(params)
            except BaseException:
                self._inflight -= 1
                raise
        except Exception as error:
            return response_for_exception(error)
        events = self._event_stream(images, params, preflight, options, started, decode_s, caller)
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)

    async def _event_stream(
        self,
        images: list[np.ndarray],
        params: FaceDetailerParams,
        preflight: Preflight,
        options: StreamOptions,
        started: float,
        decode_s: float,
        caller: Caller | None = None,
    ) -> AsyncIterator[bytes]:
        try:
            async for event in progress_events(
                lambda listener: self._run(
                    images,
                    params,
                    on_face=listener.face,
                    progress=listener if options.progress else None,
                    caller=caller,
                    preflight=preflight,
                ),
                options,
                heartbeat_s=HEARTBEAT_S,
            ):
                if event["event"] == "heartbeat":
                    yield SSE_HEARTBEAT
                elif event["event"] != "result":  # plan, progress, face
                    yield sse(event["event"], event)
                else:
                    encode_start = time.perf_counter()
                    body = result_to_json(event["result"])
                    body["timings"]["decode"] = decode_s
                    body["timings"]["encode"] = time.perf_counter() - encode_start
                    body["timings"]["total"] = time.perf_counter() - started
                    yield sse("result", body)
        except Exception as error:
            yield sse("error", error_body(stream_error(error, "/v1/detail/stream")))
        finally:
            self._inflight -= 1

    def _admit(self) -> None:
        """Count an HTTP request in, or refuse it with 429 beyond ``max_inflight_requests``."""
        if self._inflight >= self.limits.max_inflight_requests:
            raise RequestError(429, f"busy: {self._inflight} requests in progress on this replica; retry")
        self._inflight += 1
