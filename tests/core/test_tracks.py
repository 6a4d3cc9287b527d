"""Face tracks (facedetailer/tracks.py), track seeds and the flicker metric: pure logic, milliseconds."""

from __future__ import annotations

import numpy as np
import pytest

from facedetailer.flicker import box_masks, flicker_ratio, region_change
from facedetailer.seeds import SEED_MODULUS, track_frame_seed, track_seed
from facedetailer.tracks import (
    FrameBox,
    box_iou,
    link_tracks,
    select_tracks,
    smooth_boxes,
    steady_crops,
)
from facedetailer.video_params import VideoParams, split_video_values


def moving(start: tuple[float, float], step: tuple[float, float], size: float, frames: int, jitter: float = 0.0,
           seed: int = 0) -> list[tuple[float, float, float, float]]:  # fmt: skip
    rng = np.random.default_rng(seed)
    boxes = []
    for k in range(frames):
        x, y = start[0] + step[0] * k, start[1] + step[1] * k
        dx, dy, dw, dh = rng.uniform(-jitter, jitter, 4) if jitter else (0, 0, 0, 0)
        boxes.append((x + dx, y + dy, x + size + dx + dw, y + size + dy + dh))
    return boxes


def test_iou() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)


def test_two_faces_crossing_keep_their_ids() -> None:
    """Two faces moving towards each other and past: velocity prediction keeps them apart."""
    left = moving((0, 50), (6, 0), 30, 20)
    right = moving((120, 52), (-6, 0), 30, 20)
    frames = [[FrameBox(b), FrameBox(a)] for a, b in zip(left, right, strict=True)]  # detector order varies
    tracks = link_tracks(frames, iou_threshold=0.2)
    assert [track.track_id for track in tracks] == [0, 1]
    first, second = tracks
    assert first.boxes[0] == left[0] and second.boxes[0] == right[0]  # ids by first frame, left to right
    assert [first.boxes[k] for k in range(20)] == left
    assert [second.boxes[k] for k in range(20)] == right


def test_gaps_up_to_max_gap_are_bridged_by_interpolation() -> None:
    boxes = moving((10, 10), (2, 1), 40, 12)
    frames = [[FrameBox(box, 0.9)] if k not in (4, 5, 6) else [] for k, box in enumerate(boxes)]
    [track] = link_tracks(frames, max_gap=3)
    assert track.frames == list(range(12))
    assert [track.detected[k] for k in (3, 4, 5, 6, 7)] == [True, False, False, False, True]
    for k in (4, 5, 6):
        assert track.boxes[k] == pytest.approx(boxes[k])  # linear motion: interpolation is exact
    # one frame more than max_gap: two tracks
    assert len(link_tracks(frames, max_gap=2)) == 2


def test_labels_do_not_mix_and_an_unmatched_detection_starts_a_track() -> None:
    frames = [[FrameBox((0, 0, 20, 20), label="face")], [FrameBox((1, 0, 21, 20), label="hand")]]
    assert len(link_tracks(frames)) == 2


def test_select_tracks_by_size_length_and_ids() -> None:
    small = moving((0, 0), (1, 0), 20, 10)
    big = moving((100, 0), (1, 0), 60, 4)
    frames = [[FrameBox(small[k])] + ([FrameBox(big[k])] if k < 4 else []) for k in range(10)]
    tracks = link_tracks(frames)
    assert [t.length for t in tracks] == [10, 4]
    assert [t.track_id for t in select_tracks(tracks, pick="largest")] == [1]
    assert [t.track_id for t in select_tracks(tracks, pick="longest")] == [0]
    assert [t.track_id for t in select_tracks(tracks, pick="largest", max_tracks=2)] == [0, 1]
    assert [t.track_id for t in select_tracks(tracks, ids=[1])] == [1]
    assert [t.track_id for t in select_tracks(tracks, min_frames=5)] == [0]
    with pytest.raises(ValueError, match=r"no track \[7\]"):
        select_tracks(tracks, ids=[7])


def test_smoothing_keeps_still_and_linear_motion_and_damps_jitter() -> None:
    still = [(10.0, 10.0, 50.0, 50.0)] * 7
    assert smooth_boxes(still, 5) == still
    linear = moving((0, 0), (3, 2), 30, 9)
    assert np.allclose(smooth_boxes(linear, 5), linear)  # a centred mean of a line is the line
    noisy = moving((0, 0), (0, 0), 40, 40, jitter=4.0)
    centres = np.array([(b[0] + b[2]) / 2 for b in noisy])
    smooth = np.array([(b[0] + b[2]) / 2 for b in smooth_boxes(noisy, 9)])
    assert np.abs(np.diff(smooth)).mean() < 0.3 * np.abs(np.diff(centres)).mean()
    with pytest.raises(ValueError):
        smooth_boxes(still, 4)


def test_steady_crops_one_size_per_segment_and_the_face_inside() -> None:
    jittery = moving((40, 30), (2, 1), 40, 30, jitter=3.0, seed=1)
    [track] = link_tracks([[FrameBox(box)] for box in jittery])
    crops, segments = steady_crops(track, (320, 240), crop_factor=2.0, window=9, size_tolerance=1.5)
    assert len(segments) == 1 and len(crops) == 30
    sizes = {(c.crop_region[2] - c.crop_region[0], c.crop_region[3] - c.crop_region[1]) for c in crops}
    assert sizes == {segments[0].crop_size}
    for item in crops:
        x1, y1, x2, y2 = item.crop_region
        assert x1 <= item.bbox[0] and item.bbox[2] <= x2 and y1 <= item.bbox[1] and item.bbox[3] <= y2
    # steady: the crop moves with the face's mean motion, not its jitter
    starts = np.array([c.crop_region[0] for c in crops])
    assert np.abs(np.diff(starts)).max() <= 4


def test_a_zoom_cuts_the_track_into_segments_each_with_its_own_size() -> None:
    growing = [(100 - s / 2, 100 - s / 2, 100 + s / 2, 100 + s / 2) for s in np.linspace(20, 80, 25)]
    [track] = link_tracks([[FrameBox(box)] for box in growing], iou_threshold=0.5)
    crops, segments = steady_crops(track, (400, 400), crop_factor=3.0, window=1, size_tolerance=1.3)
    assert len(segments) >= 4
    assert segments[0].first_frame == 0 and segments[-1].last_frame == 24
    for segment in segments:
        members = [c for c in crops if c.segment == segment.index]
        widths = [c.bbox[2] - c.bbox[0] for c in members]
        assert max(widths) <= 1.3 * min(widths) + 1e-9
        assert {(c.crop_region[2] - c.crop_region[0]) for c in members} == {segment.crop_size[0]}
        assert segment.crop_size[0] >= max(widths) * 3.0


def test_crops_shift_inside_the_image_and_never_exceed_it() -> None:
    edge = [(0.0, 0.0, 50.0, 40.0)] * 3
    [track] = link_tracks([[FrameBox(box)] for box in edge])
    crops, segments = steady_crops(track, (100, 60), crop_factor=3.0)
    assert segments[0].crop_size == (100, 60)
    assert {c.crop_region for c in crops} == {(0, 0, 100, 60)}


def test_track_seeds_are_reproducible_per_track_and_shared_over_frames() -> None:
    assert track_seed(100, 0) == 100 and track_seed(100, 2) == 102
    assert track_seed(SEED_MODULUS - 1, 1) == 0
    shared = {track_frame_seed(track_seed(7, 1), k, shared_noise=True) for k in range(10)}
    assert shared == {8}
    assert [track_frame_seed(8, k, shared_noise=False) for k in range(3)] == [8, 9, 10]


def test_flicker_ratio_is_one_for_an_unchanged_video_and_grows_with_added_noise() -> None:
    rng = np.random.default_rng(0)
    frames = [np.clip(rng.normal(128, 5, (20, 30, 3)) + k, 0, 255).astype(np.uint8) for k in range(6)]
    masks = box_masks((20, 30), [[(5, 5, 15, 15)]] * 6)
    assert flicker_ratio(frames, frames, masks) == 1.0
    noisy = [np.clip(f.astype(int) + rng.integers(-40, 40, f.shape), 0, 255).astype(np.uint8) for f in frames]
    assert flicker_ratio(frames, noisy, masks) > 3.0
    # only the regions count: noise outside them adds nothing
    outside = [f.copy() for f in frames]
    for f in outside:
        f[16:, 16:] = rng.integers(0, 255, f[16:, 16:].shape)
    assert flicker_ratio(frames, outside, masks) == 1.0
    assert region_change(frames, box_masks((20, 30), [[]] * 6)) == 0.0


def test_video_params_split_and_validate() -> None:
    face, video = split_video_values({"steps": 4, "temporal": "tracks", "track_ids": "0,2"})
    assert face == {"steps": 4} and video == {"temporal": "tracks", "track_ids": "0,2"}
    assert VideoParams.model_validate(video).track_ids == [0, 2]
    with pytest.raises(ValueError, match="odd"):
        VideoParams(smooth_window=4)
