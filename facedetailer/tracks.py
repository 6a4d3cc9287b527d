"""Face tracks in a video: detections linked across frames, gaps bridged, crops held steady.

FaceDetailer run frame by frame gives every frame its own box, crop size, upscale and seed, so a
refined face changes from frame to frame (Impact Pack #959). Here a face is a *track*: its
detections are linked by overlap, short gaps are filled by interpolation, and its boxes are
low-passed over a window of frames. A track is cut into *segments* inside which the box size
stays within a tolerance; a segment has ONE crop size and ONE upscale, so every frame of it is
sampled at the same size (and, with one seed per track, from the same noise tensor).

The whole video is known before any face is refined, so linking is offline and deterministic:
greedy matching by IoU against each track's constant-velocity prediction (SORT's association
without its Kalman filter), then track ids renumbered by first appearance. ultralytics' online
trackers (ByteTrack/BoT-SORT) would need detections below ``bbox_threshold`` for their second
stage, keep a process-wide id counter and cannot look ahead to smooth; this module needs no
model library and runs in microseconds per frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from facedetailer.segs import Box, CropRegion

TrackPick = Literal["all", "largest", "longest"]


@dataclass(frozen=True)
class FrameBox:
    """One detection in one frame (after the detector's threshold and ``drop_size``)."""

    bbox: Box
    confidence: float = 1.0
    label: str = "face"


@dataclass
class Track:
    """One face over time: a box for every frame from its first to its last (bridged gaps included)."""

    track_id: int
    label: str
    boxes: dict[int, Box] = field(default_factory=dict)  # frame index → box, consecutive frames
    confidences: dict[int, float] = field(default_factory=dict)  # frame index → confidence (bridged: the lower end's)
    detected: dict[int, bool] = field(default_factory=dict)  # False where the box was interpolated

    @property
    def frames(self) -> list[int]:
        return sorted(self.boxes)

    @property
    def first_frame(self) -> int:
        return min(self.boxes)

    @property
    def last_frame(self) -> int:
        return max(self.boxes)

    @property
    def length(self) -> int:
        return len(self.boxes)

    @property
    def mean_area(self) -> float:
        """Mean area of the detected boxes (the ``largest`` pick's measure)."""
        areas = [box_area(self.boxes[frame]) for frame, seen in self.detected.items() if seen]
        return sum(areas) / len(areas) if areas else 0.0


def box_area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when they do not touch)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (box_area(a) + box_area(b) - inter)


def _lerp(a: Box, b: Box, t: float) -> Box:
    return tuple(x + (y - x) * t for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


@dataclass
class _Building:
    """A track while it is being linked: its observed frames in order."""

    label: str
    observed: list[tuple[int, FrameBox]] = field(default_factory=list)

    def predict(self, frame: int) -> Box:
        """The box expected at ``frame``: the last one moved at the last observed velocity."""
        last_frame, last = self.observed[-1]
        if len(self.observed) < 2:
            return last.bbox
        prev_frame, prev = self.observed[-2]
        return _lerp(prev.bbox, last.bbox, (frame - prev_frame) / (last_frame - prev_frame))


def link_tracks(
    detections: Sequence[Sequence[FrameBox]], *, iou_threshold: float = 0.3, max_gap: int = 8
) -> list[Track]:
    """Link per-frame detections into tracks; a track survives up to ``max_gap`` frames unseen.

    Each frame, every (track, detection) pair whose IoU with the track's predicted box is at
    least ``iou_threshold`` is a candidate; pairs are taken greedily by decreasing IoU, and only
    detections of the track's label. An unmatched detection starts a track. Gaps inside a track
    are bridged by linear interpolation. Ids are 0, 1, … by first frame, then left to right.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    building: list[_Building] = []
    for frame, found in enumerate(detections):
        alive = [i for i, track in enumerate(building) if frame - track.observed[-1][0] <= max_gap + 1]
        pairs = []
        for track_index in alive:
            track = building[track_index]
            predicted = track.predict(frame)
            for det_index, box in enumerate(found):
                if box.label != track.label:
                    continue
                overlap = box_iou(predicted, box.bbox)
                if overlap >= iou_threshold:
                    pairs.append((-overlap, track_index, det_index))
        pairs.sort()
        used_tracks: set[int] = set()
        used_detections: set[int] = set()
        for _, track_index, det_index in pairs:
            if track_index in used_tracks or det_index in used_detections:
                continue
            building[track_index].observed.append((frame, found[det_index]))
            used_tracks.add(track_index)
            used_detections.add(det_index)
        for det_index, box in enumerate(found):
            if det_index not in used_detections:
                building.append(_Building(box.label, [(frame, box)]))
    return _numbered([_bridged(track) for track in building])


def _bridged(track: _Building) -> Track:
    """The track with every missing frame between two observations filled by interpolation."""
    result = Track(track_id=-1, label=track.label)
    for (frame_a, a), (frame_b, b) in zip(track.observed, track.observed[1:], strict=False):
        for frame in range(frame_a + 1, frame_b):
            result.boxes[frame] = _lerp(a.bbox, b.bbox, (frame - frame_a) / (frame_b - frame_a))
            result.confidences[frame] = min(a.confidence, b.confidence)
            result.detected[frame] = False
    for frame, box in track.observed:
        result.boxes[frame] = box.bbox
        result.confidences[frame] = box.confidence
        result.detected[frame] = True
    result.boxes = dict(sorted(result.boxes.items()))
    return result


def _numbered(tracks: list[Track]) -> list[Track]:
    def key(track: Track) -> tuple[int, float, float]:
        box = track.boxes[track.first_frame]
        return (track.first_frame, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2)

    ordered = sorted(tracks, key=key)
    for number, track in enumerate(ordered):
        track.track_id = number
    return ordered


def select_tracks(
    tracks: Sequence[Track],
    *,
    pick: TrackPick = "all",
    ids: Sequence[int] | None = None,
    max_tracks: int | None = None,
    min_frames: int = 1,
) -> list[Track]:
    """The tracks to refine: ``ids`` (if given), at least ``min_frames`` long, then ``pick``.

    ``largest`` ranks by the mean area of the detected boxes, ``longest`` by frames; either keeps
    ``max_tracks`` (1 by default), ``all`` keeps every track (or the first ``max_tracks`` by id).
    The result is in id order. An id that names no track is a ``ValueError``.
    """
    chosen = list(tracks)
    if ids is not None:
        known = {track.track_id for track in tracks}
        unknown = sorted(set(ids) - known)
        if unknown:
            raise ValueError(f"track_ids: no track {unknown}; the video has tracks {sorted(known)}")
        chosen = [track for track in chosen if track.track_id in set(ids)]
    chosen = [track for track in chosen if track.length >= min_frames]
    if pick == "largest":
        chosen.sort(key=lambda track: (-track.mean_area, track.track_id))
    elif pick == "longest":
        chosen.sort(key=lambda track: (-track.length, track.track_id))
    limit = max_tracks if max_tracks is not None else (None if pick == "all" else 1)
    if limit is not None:
        chosen = chosen[:limit]
    return sorted(chosen, key=lambda track: track.track_id)


def smooth_boxes(boxes: Sequence[Box], window: int) -> list[Box]:
    """Centred moving average of each box's centre and size over ``window`` frames (odd; 1 = none).

    Near the ends the window shrinks symmetrically, so the first and last boxes stay their own
    and a still face gives back its boxes exactly.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd number >= 1, got {window}")
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]) for b in boxes]
    half = window // 2
    smoothed: list[Box] = []
    for index in range(len(centres)):
        reach = min(half, index, len(centres) - 1 - index)
        part = centres[index - reach : index + reach + 1]
        cx, cy, width, height = (sum(values) / len(part) for values in zip(*part, strict=True))
        smoothed.append((cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2))
    return smoothed


@dataclass(frozen=True)
class SteadySegment:
    """Consecutive frames of a track sampled at one crop size and one upscale."""

    index: int
    first_frame: int
    last_frame: int
    crop_size: tuple[int, int]  # (width, height) of every crop region of the segment
    reference_box: tuple[float, float]  # (width, height): the box size the upscale is planned from


@dataclass(frozen=True)
class TrackFrame:
    """A track in one frame: its smoothed box (the face mask) and its steady crop region."""

    frame: int
    bbox: Box
    crop_region: CropRegion
    segment: int
    detected: bool


def _place(limit: int, centre: float, size: int) -> tuple[int, int]:
    """A window of integer ``size`` centred at ``centre``, shifted inside [0, limit] (as make_crop_region)."""
    size = min(size, limit)
    start = int(centre - size / 2)  # truncated toward zero, as the reference's int()
    start = min(max(start, 0), limit - size)
    return start, start + size


def _segment_bounds(sizes: Sequence[tuple[float, float]], tolerance: float) -> list[tuple[int, int]]:
    """Cut a sequence of box sizes where max/min of the width or height would exceed ``tolerance``."""
    bounds: list[tuple[int, int]] = []
    start = 0
    low_w = high_w = sizes[0][0]
    low_h = high_h = sizes[0][1]
    for index in range(1, len(sizes)):
        width, height = sizes[index]
        new_low_w, new_high_w = min(low_w, width), max(high_w, width)
        new_low_h, new_high_h = min(low_h, height), max(high_h, height)
        if new_high_w > tolerance * new_low_w or new_high_h > tolerance * new_low_h:
            bounds.append((start, index - 1))
            start, low_w, high_w, low_h, high_h = index, width, width, height, height
        else:
            low_w, high_w, low_h, high_h = new_low_w, new_high_w, new_low_h, new_high_h
    bounds.append((start, len(sizes) - 1))
    return bounds


def steady_crops(
    track: Track,
    image_size: tuple[int, int],
    *,
    crop_factor: float,
    window: int = 9,
    size_tolerance: float = 1.25,
) -> tuple[list[TrackFrame], list[SteadySegment]]:
    """Smoothed boxes and steady crop regions for every frame of ``track`` in an image of (W, H).

    The boxes are low-passed (:func:`smooth_boxes`); the track is cut into segments whose box
    widths and heights each stay within ``size_tolerance`` (max/min). A segment's crop size is its
    largest box × ``crop_factor`` (rounded up, at most the image), so the face always fits; each
    frame's crop of that size is centred on the frame's smoothed box and shifted inside the image.
    The upscale is planned from the segment's median box size.
    """
    if size_tolerance < 1.0:
        raise ValueError(f"size_tolerance must be >= 1, got {size_tolerance}")
    width, height = image_size
    frames = track.frames
    smoothed = smooth_boxes([track.boxes[frame] for frame in frames], window)
    sizes = [(box[2] - box[0], box[3] - box[1]) for box in smoothed]
    segments: list[SteadySegment] = []
    result: list[TrackFrame] = []
    for number, (start, end) in enumerate(_segment_bounds(sizes, size_tolerance)):
        part = sizes[start : end + 1]
        crop_w = min(width, max(1, math.ceil(max(w for w, _ in part) * crop_factor - 1e-9)))
        crop_h = min(height, max(1, math.ceil(max(h for _, h in part) * crop_factor - 1e-9)))
        reference = (_median([w for w, _ in part]), _median([h for _, h in part]))
        segments.append(SteadySegment(number, frames[start], frames[end], (crop_w, crop_h), reference))
        for offset in range(start, end + 1):
            box = smoothed[offset]
            x1, x2 = _place(width, (box[0] + box[2]) / 2, crop_w)
            y1, y2 = _place(height, (box[1] + box[3]) / 2, crop_h)
            frame = frames[offset]
            result.append(TrackFrame(frame, box, (x1, y1, x2, y2), number, track.detected[frame]))
    return result, segments


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
