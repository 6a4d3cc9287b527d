"""The video request's own options (besides FaceDetailer's): tracks, temporal consistency, output.

Defaults were chosen by the flicker metric (``docs/video.md``): ``temporal="shared_noise"``
adds the least flicker of the three modes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from facedetailer.tracks import TrackPick

TemporalMode = Literal["frames", "tracks", "shared_noise"]


class VideoParams(BaseModel):
    """How a video is detailed; every field has a default, so a plain FaceDetailer request works."""

    model_config = ConfigDict(extra="forbid")

    temporal: TemporalMode = Field(
        "shared_noise",
        description="'frames': FaceDetailer on each frame on its own (the reference's batch: seed + frame); "
        "'tracks': faces linked into tracks, steady crops, one seed per track plus the frame index; "
        "'shared_noise': tracks, and every frame of a track sampled with the track's seed, so its crops share "
        "one noise tensor (the least flicker, the default).",
    )
    track_iou: float = Field(0.3, gt=0.0, le=1.0, description="IoU with a track's predicted box to join it")
    max_gap: int = Field(8, ge=0, le=300, description="frames a track may go undetected; gaps are interpolated")
    smooth_window: int = Field(9, ge=1, le=301, description="frames the boxes are averaged over (odd)")
    size_tolerance: float = Field(
        1.25, ge=1.0, le=10.0, description="max/min box size inside one track segment (one crop size each)"
    )
    pick_tracks: TrackPick = Field("all", description="'all', or only the 'largest' / 'longest' track(s)")
    track_ids: list[int] | None = Field(None, description="refine only these track ids (see a first run's tracks)")
    max_tracks: int | None = Field(None, ge=1, description="keep at most this many tracks (largest/longest: 1)")
    min_track_frames: int = Field(1, ge=1, description="drop tracks shorter than this (spurious detections)")
    latent_blend: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="tracks modes: start each crop from (1 − w)·its encoding + w·the same track's final latent in "
        "the previous frame. Frames are then sampled one after another (no cross-frame batching, no parallel "
        "segments): see docs/video.md",
    )
    segment_frames: int = Field(
        16, ge=1, le=100000, description="frames per inpainter call; segments run concurrently on the replicas"
    )
    crf: int = Field(18, ge=0, le=51, description="H.264 constant rate factor of the output (lower = better)")

    @field_validator("smooth_window")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd (a centred window), got {value}")
        return value

    @field_validator("track_ids", mode="before")
    @classmethod
    def _ids_as_text(cls, value: Any) -> Any:
        """A form field or CLI ``--param`` carries the list as JSON text or '1,3'."""
        if isinstance(value, str):
            text = value.strip().strip("[]")
            return [int(part) for part in text.split(",") if part.strip()]
        if isinstance(value, int):
            return [value]
        return value


def split_video_values(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A request's values → (FaceDetailer values, video values), by :class:`VideoParams`' field names."""
    video_fields = set(VideoParams.model_fields)
    face = {key: value for key, value in values.items() if key not in video_fields}
    video = {key: value for key, value in values.items() if key in video_fields}
    return face, video
