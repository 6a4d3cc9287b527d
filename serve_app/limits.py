"""Work limits: refuse a request that would hold the inpainter too long, before it does any work.

One request must not stall everyone else: ``steps=10000`` or ``guide_size=max_size=16384`` is a
valid FaceDetailer input, but on a shared service it burns a GPU for minutes. The operator sets
``limits`` in the config (listed by ``GET /v1/info``):

- ``max_steps``: the request's ``steps`` (checked before any model work);
- ``max_sample_pixels``: the area (width × height) of each upscaled crop the inpainter samples;
- ``max_faces_per_image``: faces the inpainter would refine in one image;
- ``max_work_units``: the request's total sampling work, in **work units**: one unit is one
  sampling step of one 512×512 crop, so a face costs ``steps × cycle × (width × height) / 512²``,
  summed over every face of every image. The UNet's cost grows with the latent area, so a
  1024×1024 crop counts 4 units per step; 2nd-order samplers (heun, dpm_2) evaluate the UNet
  twice per step and are not weighted more.

Faces and sample sizes are only known after detection and planning; :func:`check_planned_work`
runs then, before the first inpainter call. A request over a limit is refused with 422 naming
the limit, its value and the value asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from facedetailer.params import FaceDetailerParams
from facedetailer.safe_paths import check_name
from serve_app.config import Limits
from serve_app.pipeline import PlannedFace

WORK_UNIT_PIXELS = 512 * 512


# the inputs that lower what each limit counts: a 422's ``details`` name them as fields
LIMIT_FIELDS: dict[str, tuple[str, ...]] = {
    "max_steps": ("steps",),
    "max_sample_pixels": ("guide_size", "max_size"),
    "max_faces_per_image": ("bbox_threshold", "drop_size"),
    "max_work_units": ("steps", "cycle", "guide_size", "max_size"),
}


class LimitExceededError(ValueError):
    """A request over one of the configured work limits."""

    def __init__(self, limit: str, limit_value: float, requested: float, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.limit_value = limit_value
        self.requested = requested

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.limit, self.limit_value, self.requested, str(self)))

    def details(self) -> list[dict[str, Any]]:
        """The service's error ``details`` shape — one ``{"field", "message"}`` per input that lowers
        what the limit counts — each with the limit, its value and the value asked."""
        facts = {"limit": f"limits.{self.limit}", "limit_value": self.limit_value, "requested": self.requested}
        return [{"field": field, "message": str(self), **facts} for field in LIMIT_FIELDS[self.limit]]


def face_work_units(params: FaceDetailerParams, sample_size: tuple[int, int]) -> float:
    """``steps × cycle × (width × height) / 512²`` for one face."""
    width, height = sample_size
    return params.steps * params.cycle * width * height / WORK_UNIT_PIXELS


def planned_work_units(params: FaceDetailerParams, faces: Sequence[PlannedFace]) -> float:
    """The request's work units over every planned face (``max_work_units`` and the keys' hourly quotas)."""
    return sum(face_work_units(params, face.sample_size) for face in faces)


def check_request(params: FaceDetailerParams, limits: Limits) -> None:
    """What the parameters alone exceed (before any model work)."""
    if params.steps > limits.max_steps:
        raise LimitExceededError(
            "max_steps",
            limits.max_steps,
            params.steps,
            f"steps: {params.steps} exceeds limits.max_steps = {limits.max_steps} on this service",
        )


def check_planned_work(params: FaceDetailerParams, faces: Sequence[PlannedFace], limits: Limits) -> None:
    """What the planned faces exceed (after detection, before the inpainter)."""
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
    total = planned_work_units(params, faces)
    if total > limits.max_work_units:
        raise LimitExceededError(
            "max_work_units",
            limits.max_work_units,
            round(total, 1),
            f"the request needs {total:.0f} work units (steps × cycle × crop pixels / 512², summed over "
            f"{len(faces)} faces), over limits.max_work_units = {limits.max_work_units}; lower steps, cycle, "
            "guide_size or max_size",
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
