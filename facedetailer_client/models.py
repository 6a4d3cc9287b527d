"""Typed results of the facedetailer-serve HTTP API (``/v1/detail?format=json`` and the stream)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Segment:
    """One face: where it was found, what was done with it, and why not if skipped."""

    index: int
    bbox: tuple[float, float, float, float]
    crop_region: tuple[int, int, int, int]
    confidence: float
    label: str
    seed: int | None
    upscale: float | None
    upscaled_size: tuple[int, int] | None
    skipped: bool
    skip_reason: str | None
    prompt: str | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Segment:
        upscaled = data.get("upscaled_size")
        return cls(
            index=int(data["index"]),
            bbox=tuple(float(v) for v in data["bbox"]),  # type: ignore[arg-type]
            crop_region=tuple(int(v) for v in data["crop_region"]),  # type: ignore[arg-type]
            confidence=float(data["confidence"]),
            label=str(data.get("label", "")),
            seed=data.get("seed"),
            upscale=data.get("upscale"),
            upscaled_size=tuple(upscaled) if upscaled else None,  # type: ignore[arg-type]
            skipped=bool(data.get("skipped", False)),
            skip_reason=data.get("skip_reason"),
            prompt=data.get("prompt"),
        )


@dataclass(frozen=True)
class FaceEvent:
    """A face finished while the request runs (``/v1/detail/stream``): refined or skipped."""

    image: int
    status: str  # "refined" or the skip reason
    segment: Segment

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaceEvent:
        return cls(image=int(data.get("image", 0)), status=str(data["status"]), segment=Segment.from_json(data))


@dataclass(frozen=True)
class PlannedFace:
    """A face the inpainter is about to sample (``plan`` event): where it is and its sample size."""

    image: int
    index: int
    crop_region: tuple[int, int, int, int]
    sample_size: tuple[int, int]  # (width, height) of the upscaled crop

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlannedFace:
        return cls(
            image=int(data["image"]),
            index=int(data["index"]),
            crop_region=tuple(int(v) for v in data["crop_region"]),  # type: ignore[arg-type]
            sample_size=tuple(int(v) for v in data["sample_size"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class PlanEvent:
    """After detection, before the inpainter starts: every face it will sample."""

    faces: list[PlannedFace]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlanEvent:
        return cls(faces=[PlannedFace.from_json(face) for face in data.get("faces", [])])


@dataclass(frozen=True)
class StepProgress:
    """A sampler step of a face (``progress`` event): ``done`` of ``total`` steps over its cycles.

    ``eta_s`` is the face's estimated time left, ``request_eta_s`` the request's (None until the
    service has seen enough steps). ``preview`` is a small JPEG of the step's latent (one pixel per
    latent cell, ``preview_size`` = (width, height)) when the stream asked for ``preview_every``;
    it shows the face's crop region, ``crop_region`` in the image.
    """

    image: int
    index: int
    crop_region: tuple[int, int, int, int]
    cycle: int
    cycles: int
    step: int
    steps: int
    done: int
    total: int
    eta_s: float | None
    request_eta_s: float | None
    preview: bytes | None = None
    preview_size: tuple[int, int] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepProgress:
        preview = data.get("preview")
        size = data.get("preview_size")
        return cls(
            image=int(data.get("image", 0)),
            index=int(data["index"]),
            crop_region=tuple(int(v) for v in data["crop_region"]),  # type: ignore[arg-type]
            cycle=int(data["cycle"]),
            cycles=int(data["cycles"]),
            step=int(data["step"]),
            steps=int(data["steps"]),
            done=int(data["done"]),
            total=int(data["total"]),
            eta_s=data.get("eta_s"),
            request_eta_s=data.get("request_eta_s"),
            preview=base64.b64decode(preview) if preview else None,
            preview_size=tuple(size) if size else None,  # type: ignore[arg-type]
        )


def decode_png(data: bytes) -> Any:
    """PNG bytes → numpy array (needs numpy and Pillow, which the client does not require)."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


@dataclass(frozen=True)
class DetailResult:
    """Every FaceDetailer output as PNG bytes, with per-face metadata and stage timings.

    ``images``/``masks`` hold one PNG per input image; the crop lists are the node's (each
    image's crops sorted by size, or one 64×64 black placeholder for an image without any,
    joined in image order).
    ``array(png)`` decodes any of them.
    """

    images: list[bytes]
    masks: list[bytes]
    cropped_refined: list[bytes]
    cropped_enhanced_alpha: list[bytes]
    cnet_images: list[bytes]
    segments: list[list[Segment]]
    faces_detected: int
    faces_refined: int
    timings: dict[str, float]
    detailer_pipe: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> bytes:
        """The first detailed image (PNG)."""
        return self.images[0]

    @property
    def mask(self) -> bytes:
        return self.masks[0]

    @staticmethod
    def array(png: bytes) -> Any:
        return decode_png(png)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DetailResult:
        def pngs(key: str) -> list[bytes]:
            return [base64.b64decode(text) for text in data.get(key) or []]

        return cls(
            images=pngs("images") or [base64.b64decode(data["image"])],
            masks=pngs("masks") or [base64.b64decode(data["mask"])],
            cropped_refined=pngs("cropped_refined"),
            cropped_enhanced_alpha=pngs("cropped_enhanced_alpha"),
            cnet_images=pngs("cnet_images"),
            segments=[[Segment.from_json(item) for item in image] for image in data.get("segments", [])],
            faces_detected=int(data.get("faces_detected", 0)),
            faces_refined=int(data.get("faces_refined", 0)),
            timings={key: float(value) for key, value in (data.get("timings") or {}).items()},
            detailer_pipe=data.get("detailer_pipe") or {},
        )


class ServiceError(Exception):
    """The service refused or failed a request: its HTTP status and the message it gave.

    ``details`` lists ``{"field", "message"}`` when the error names inputs; ``retry_after`` is
    the wait the service asked for (429/503), if any; ``request_id`` is the request's id (quote
    it to the operator: the service's log line for the request carries it).
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{status_code}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.status_code = status_code
        self.message = message
        self.details = details or []
        self.retry_after = retry_after
        self.request_id = request_id

    @property
    def fields(self) -> list[str]:
        return [str(item.get("field")) for item in self.details if item.get("field")]


class RetryBudgetExceeded(ServiceError):
    """Still 429/503 (or unreachable) when the retry budget ran out; the last answer is kept."""
