"""The OpenAPI description of the HTTP API: request bodies, response bodies and the error shape.

The routes read their bodies themselves (multipart or JSON, with limits checked before
decoding), so FastAPI cannot infer the bodies: they are described here and attached to the
routes. The schema is complete enough for a fuzzer (schemathesis, ``tests/serve/test_api_fuzz.py``)
to generate real requests from it — images, parameters with hooks and ControlNet, workflows —
and every response is documented, errors included, so it can check each answer against it.

:func:`error_responses` documents error statuses in the one error shape; a module adding a status
(e.g. 401/403 for API keys) adds its description to :data:`ERROR_DESCRIPTIONS` and lists it.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from facedetailer.params import FaceDetailerParams

COMPONENTS = "#/components/schemas/{model}"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
REQUEST_ID_HEADER_DOC = {
    "X-Request-ID": {
        "description": "the request's id: also in error bodies and the server log",
        "schema": {"type": "string"},
    }
}
RETRY_AFTER_HEADER_DOC = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}
}

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed input: a corrupt or truncated image, a malformed multipart body.",
    404: "No such route or web asset.",
    405: "Method not allowed on this route.",
    413: "Too large: the body, an image's bytes or pixels, or too many images (limits in GET /v1/info).",
    415: "Not an accepted image format (PNG, JPEG, WebP) or content type.",
    422: "A parameter, a work or prompt limit, a JSON bound or a name refused; `details` names the inputs.",
    429: "Busy: too many requests in progress on this ingress replica; retry after Retry-After.",
    500: "Internal error: the body only carries the request id, the server log has the details.",
    503: "A model deployment is unavailable or the inpainter's queue is full; retry after Retry-After.",
    504: "The request took longer than limits.request_timeout_s.",
}


class ErrorDetail(BaseModel):
    """One input an error is about; a work limit's entries add ``limit``, ``limit_value``, ``requested``,
    a refused file name's ``name`` and ``reason`` (such an entry has no ``field``)."""

    model_config = ConfigDict(extra="allow")

    field: str | None = Field(None, description="the input, as the request names it (dotted for nested values)")
    message: str


class ErrorBody(BaseModel):
    """Every error answer of the service, on every route."""

    error: str = Field(description="what is wrong; no exception text, no server path")
    status: int = Field(description="the HTTP status, repeated")
    request_id: str = Field(description="also the X-Request-ID header and the server's log line for the request")
    details: list[ErrorDetail] = Field(default_factory=list, description="the inputs the error is about")


class SegmentJson(BaseModel):
    index: int
    bbox: list[float]
    crop_region: list[int]
    confidence: float
    label: str
    seed: int | None = None
    upscale: float | None = None
    upscaled_size: list[int] | None = None
    skipped: bool
    skip_reason: str | None = None
    prompt: str | None = None


class DetailJson(BaseModel):
    """``?format=json`` (and the stream's ``result`` event): every FaceDetailer output, base64 PNGs."""

    image: str
    images: list[str]
    mask: str
    masks: list[str]
    cropped_refined: list[str]
    cropped_enhanced_alpha: list[str]
    cnet_images: list[str]
    segments: list[list[SegmentJson]]
    faces_detected: int
    faces_refined: int
    timings: dict[str, float]
    detailer_pipe: dict[str, Any]


class TrackSegmentJson(BaseModel):
    index: int
    first_frame: int
    last_frame: int
    crop_size: list[int]
    upscale: float | None = None
    upscaled_size: list[int] | None = None


class TrackJson(BaseModel):
    """A face track of a video: its frames, whether it was refined, its seed and crop segments."""

    track_id: int
    label: str
    first_frame: int
    last_frame: int
    frames: int
    detected_frames: int
    selected: bool
    position: int | None = None
    seed: int | None = None
    prompt: str | None = None
    skipped: bool = False
    skip_reason: str | None = None
    segments: list[TrackSegmentJson]


class VideoJson(BaseModel):
    """``/v1/detail/video?format=json`` (and the video stream's ``result``): the file and its facts."""

    video: str = Field(description="the detailed file, base64")
    container: Literal["mp4", "mov", "mkv"]
    media_type: str
    video_codec: str
    pixel_format: str
    audio_copied: bool
    frames: int
    width: int
    height: int
    average_rate: str | None
    temporal: Literal["frames", "tracks", "shared_noise"]
    faces_refined: int
    flicker: float = Field(description="face-region frame-to-frame change, output / input (1.0 = none added)")
    segments: int
    tracks: list[TrackJson]
    timings: dict[str, float]


class HealthJson(BaseModel):
    status: Literal["ok", "unhealthy"]
    deployments: dict[str, str] = Field(description='"ok" or "unhealthy: <kind of failure>" per model deployment')


class InfoJson(BaseModel):
    """What the service serves: models (configured names and references, no server paths), names, limits."""

    model_config = ConfigDict(extra="allow")

    models: dict[str, Any]
    samplers: list[str]
    schedulers: list[str]
    limits: dict[str, Any]
    defaults: dict[str, Any]
    parameters: list[dict[str, Any]]
    checkpoints: list[str]
    controlnets: dict[str, Any]
    wildcards: list[str]


class StatsJson(BaseModel):
    model_config = ConfigDict(extra="allow")

    inpainter: dict[str, Any]


class WorkflowImportJson(BaseModel):
    params: dict[str, Any]
    node_id: str
    node_title: str | None
    format: Literal["api", "ui"]
    models: dict[str, dict[str, Any]]


# One Server-Sent Event of /v1/detail/stream (OpenAPI 3.1 describes each event with ``schema``):
# ``data`` is JSON — a face event, the ?format=json body (``result``) or the error shape (``error``).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "enum": ["face", "result", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["event", "data"],
}


# One Server-Sent Event of /v1/detail/video/stream: ``progress`` (frames done, elapsed, ETA), the
# ?format=json body (``result``) or the error shape (``error``).
VIDEO_SSE_EVENT_SCHEMA: dict[str, Any] = {
    **SSE_EVENT_SCHEMA,
    "properties": {
        **SSE_EVENT_SCHEMA["properties"],
        "event": {"type": "string", "enum": ["progress", "result", "error"]},
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route for these error statuses, each in the error shape."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        headers = {**REQUEST_ID_HEADER_DOC, **(RETRY_AFTER_HEADER_DOC if status in (429, 503) else {})}
        responses[status] = {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status], "headers": headers}
    return responses


def json_response(
    model: type[BaseModel], description: str, links: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    """A 200 with a JSON body of ``model`` (and OpenAPI ``links`` to the operations its values feed)."""
    return {200: {"model": model, "description": description, **({"links": links} if links else {})}}


# ---- each route's responses --------------------------------------------------------------------

DETAIL_ERRORS = (400, 413, 415, 422, 429, 500, 503, 504)
DETAIL_RESPONSES = {
    200: {
        "description": "The detailed image (PNG), or with ?format=json every output.",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": COMPONENTS.format(model="DetailJson")}},
        },
        "model": DetailJson,
    },
    **error_responses(*DETAIL_ERRORS),
}
STREAM_RESPONSES = {
    200: {
        "description": "Server-Sent Events: `face` per finished face, then `result` (or `error`).",
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    },
    **error_responses(*DETAIL_ERRORS),
}
VIDEO_MEDIA_TYPES = ("video/mp4", "video/quicktime", "video/x-matroska")
VIDEO_FACT_HEADERS = {
    name: {"description": description, "schema": {"type": "string"}}
    for name, description in {
        "X-Faces-Refined": "face crops refined over all frames",
        "X-Tracks": "face tracks refined",
        "X-Flicker": "the flicker figure (1.0 = no flicker added in the face regions)",
        "X-Video-Codec": "the output's video codec (h264, or the documented fallback)",
        "X-Audio-Copied": "true when the input's audio stream was copied",
    }.items()
}
VIDEO_RESPONSES = {
    200: {
        "description": "The detailed video file (the container asked for, or Matroska when the audio needs it; "
        "facts in X-… headers), or with ?format=json everything as JSON.",
        "content": {
            **{media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in VIDEO_MEDIA_TYPES},
            "application/json": {"schema": {"$ref": COMPONENTS.format(model="VideoJson")}},
        },
        "model": VideoJson,
    },
    **error_responses(*DETAIL_ERRORS),
}
VIDEO_STREAM_RESPONSES = {
    200: {
        "description": "Server-Sent Events: `progress` as frames finish, then `result` (or `error`).",
        "content": {"text/event-stream": {"schema": VIDEO_SSE_EVENT_SCHEMA}},
    },
    **error_responses(*DETAIL_ERRORS),
}
HEALTH_RESPONSES = {
    200: {"model": HealthJson, "description": "Every model deployment answers its health probe."},
    503: {"model": HealthJson, "description": "A deployment is unhealthy."},
}
INFO_RESPONSES = {**json_response(InfoJson, "Models, names, limits and defaults."), **error_responses(500, 503)}
STATS_RESPONSES = {**json_response(StatsJson, "The inpainter engine's statistics."), **error_responses(500, 503)}


# ---- request bodies (the routes read them themselves) -----------------------------------------

_WORKFLOW_DOC = "a ComfyUI workflow (API or UI saved format) whose FaceDetailer node gives the parameters"
# A small API-format workflow: the fuzzer starts from it, and it documents the format.
EXAMPLE_WORKFLOW: dict[str, Any] = {
    "1": {
        "class_type": "FaceDetailer",
        "inputs": {"steps": 2, "denoise": 0.4, "guide_size": 128, "max_size": 256, "seed": 3, "cycle": 1},
    }
}
_PARAMS_REF = {"$ref": COMPONENTS.format(model="FaceDetailerParams")}
# A 48×48 grey PNG: the smallest useful example image (a real request sends a photo).
EXAMPLE_PNG_BASE64 = (
    "iVBORw0KGgoAAAANSUhEUgAAADAAAAAwCAIAAADYYG7QAAAAOElEQVR42u3OAQ0AAAgDIDX5o1vDOUhAJ6lLpo4REhISEhISEhISEhISEhISEhISEhISEhIS+hxa+9MB4JKdl4QAAAAASUVORK5CYII="
)
EXAMPLE_PARAMS = {"steps": 2, "denoise": 0.4, "guide_size": 64, "max_size": 128, "seed": 3}

DETAIL_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"},
                        "params": {
                            "type": "string",
                            "description": "JSON object of parameters (FaceDetailerParams)",
                            "examples": ['{"steps": 2, "guide_size": 128, "max_size": 256}'],
                        },
                        "workflow": {"type": "string", "description": _WORKFLOW_DOC + " (text or a file)"},
                        "workflow_node": {"type": "string", "description": "FaceDetailer node id, if several"},
                    },
                    "required": ["image"],
                    "additionalProperties": {"type": "string", "description": "one parameter by name, e.g. steps=20"},
                },
                "encoding": {"image": {"contentType": ", ".join(IMAGE_TYPES)}},
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "byte", "description": "base64 PNG/JPEG/WebP"},
                        "images": {
                            "anyOf": [
                                {"type": "array", "items": {"type": "string", "format": "byte"}, "minItems": 1},
                                {"type": "null"},
                            ],
                            "description": "a batch: base64 images (image k uses seed + k)",
                        },
                        "params": {"anyOf": [_PARAMS_REF, {"type": "null"}]},
                        "workflow": {"anyOf": [{"type": "object"}, {"type": "null"}], "description": _WORKFLOW_DOC},
                        "workflow_node": {
                            "anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}],
                            "description": "FaceDetailer node id, if several",
                        },
                    },
                    "description": "`image` or `images`; parameters in `params` (or at the top level)",
                },
                "examples": {
                    "params": {"value": {"image": EXAMPLE_PNG_BASE64, "params": EXAMPLE_PARAMS}},
                    "workflow": {"value": {"image": EXAMPLE_PNG_BASE64, "workflow": EXAMPLE_WORKFLOW}},
                },
            },
        },
    }
}

_VIDEO_OPTIONS_DOC = (
    "video options by name (temporal, pick_tracks, max_tracks, track_ids, latent_blend, segment_frames, crf, …; "
    "docs/video.md) or one FaceDetailer parameter by name, e.g. steps=20"
)
VIDEO_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "video": {"type": "string", "format": "binary", "description": "mp4, mov, mkv, webm, …"},
                        "params": {
                            "type": "string",
                            "description": "JSON object of FaceDetailer parameters and video options",
                            "examples": ['{"steps": 2, "guide_size": 64, "max_size": 128, "temporal": "tracks"}'],
                        },
                        "temporal": {"type": "string", "enum": ["frames", "tracks", "shared_noise"]},
                        "workflow": {"type": "string", "description": _WORKFLOW_DOC + " (text or a file)"},
                        "workflow_node": {"type": "string", "description": "FaceDetailer node id, if several"},
                    },
                    "required": ["video"],
                    "additionalProperties": {"type": "string", "description": _VIDEO_OPTIONS_DOC},
                },
                "encoding": {"video": {"contentType": ", ".join(VIDEO_MEDIA_TYPES)}},
            },
        },
    }
}

WORKFLOW_IMPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "workflow": {
                            "description": _WORKFLOW_DOC + " (an object, or its JSON text)",
                            "anyOf": [{"type": "object"}, {"type": "string"}],
                            "examples": [EXAMPLE_WORKFLOW],
                        },
                        "workflow_node": {
                            "description": "FaceDetailer node id, if several",
                            "anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}],
                        },
                    },
                    "required": ["workflow"],
                },
                "examples": {"api": {"value": {"workflow": EXAMPLE_WORKFLOW}}},
            }
        },
    }
}


def install_openapi(app: FastAPI) -> None:
    """Generate ``app``'s schema with the parameter models the request bodies refer to as components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _, definitions = models_json_schema([(FaceDetailerParams, "validation")], ref_template=COMPONENTS)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in definitions.get("$defs", {}).items():
                components.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
