"""Videos in-process (no Ray): a synthetic clip of two real faces (the astronaut and Zidane, moving
and growing) through the real face detector and the tiny SD inpainter.

Checked: the tracks are found and stable, one seed per track (shared over its frames), one crop
size and one sample size per track segment, crops that move by the face's motion only, the audio
packets and the timestamps kept, the result of one segment equal to that of several, frame mode
equal to FaceDetailer's batch, and the flicker figure lower with shared noise than frame by frame.
"""

from __future__ import annotations

import io
from functools import cache

import av
import numpy as np
import pytest

from deployments.detector import FaceDetector
from deployments.inpainter import Inpainter
from deployments.testing import assets
from deployments.testing.video_clip import ClipSpec, clip_frames, encode_clip
from facedetailer.params import FaceDetailerParams
from facedetailer.video_params import VideoParams
from serve_app.config import Limits
from serve_app.limits import LimitExceededError
from serve_app.local import LocalStages
from serve_app.video.codec import decode_video, probe_video
from serve_app.video.limits import check_video_info

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SPEC = ClipSpec(frames=12)
FAST = FaceDetailerParams(steps=2, guide_size=64, max_size=256, bbox_crop_factor=2.0, seed=7)


@pytest.fixture(scope="module")
def stages(tiny_sd: dict) -> LocalStages:
    return LocalStages(
        detector=FaceDetector(str(assets.faceghost_face_onnx()), task="detect", device="cpu"),
        inpainter=Inpainter(tiny_sd["pipeline"], device="cpu"),
    )


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_clip(clip_frames(SPEC), SPEC)


@pytest.fixture(scope="module")
def runs(stages: LocalStages, clip: bytes):
    """Each mode once (shared_noise also in 5-frame segments), memoised for the module."""

    @cache
    def run(temporal: str, segment_frames: int = 16, latent_blend: float = 0.0):
        video = VideoParams(temporal=temporal, segment_frames=segment_frames, latent_blend=latent_blend)
        return stages.detail_video(clip, FAST, video, keep_result=True)

    return run


def audio_packets(data: bytes) -> list[bytes]:
    with av.open(io.BytesIO(data)) as container:
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.dts is not None]


def test_two_tracks_over_every_frame_one_seed_each_and_steady_crops(runs) -> None:
    response = runs("shared_noise")
    tracks = [track for track in response.tracks if track.selected]
    assert len(tracks) == 2, response.tracks
    assert all(track.first_frame == 0 and track.last_frame == SPEC.frames - 1 for track in tracks)
    assert [track.seed for track in tracks] == [FAST.seed, FAST.seed + 1]  # seed + position, as faces of an image
    assert response.faces_refined == 2 * SPEC.frames
    per_frame = response.result.frame_reports
    for track in tracks:
        reports = [next(r for r in frame if r.index == track.position) for frame in per_frame]
        assert {r.seed for r in reports} == {track.seed}, "shared noise: the track's seed in every frame"
        for segment in track.segments:
            members = reports[segment.first_frame : segment.last_frame + 1]
            regions = [r.crop_region for r in members]
            assert {(x2 - x1, y2 - y1) for x1, y1, x2, y2 in regions} == {segment.crop_size}
            assert {r.upscaled_size for r in members} == {segment.upscaled_size}
            assert len({r.upscale for r in members}) == 1
            starts = np.array([region[:2] for region in regions])
            steps = np.diff(starts, axis=0)  # the astronaut moves ≈ 6.4 px a frame, Zidane ≈ 1
            assert np.abs(steps).max() <= 9, "the crop moves with the face, no jumps"
            assert np.abs(np.diff(steps, axis=0)).max() <= 4, "…at a steady pace (the boxes are low-passed)"


def test_tracks_mode_adds_the_frame_to_the_track_seed(runs) -> None:
    response = runs("tracks")
    track = next(track for track in response.tracks if track.selected)
    seeds = [next(r for r in frame if r.index == track.position).seed for frame in response.result.frame_reports]
    assert seeds == [track.seed + k for k in range(SPEC.frames)]


def test_timestamps_frame_rate_and_audio_are_kept(runs, clip: bytes) -> None:
    response = runs("shared_noise")
    source, result = decode_video(clip), decode_video(response.data)
    assert result.pts == source.pts and len(result.frames) == SPEC.frames
    assert probe_video(response.data).average_rate == SPEC.fps
    assert response.audio_copied and audio_packets(response.data) == audio_packets(clip)
    assert response.video_codec == "libx264" and response.container == "mp4"
    # the faces changed, the background did not (beyond H.264's re-encoding)
    changed = np.abs(result.frames[5].astype(int) - source.frames[5].astype(int)).mean(axis=2) > 12
    assert changed[40:110, 50:110].mean() > 0.3 and changed[:, 160:200].mean() < 0.02


def test_one_segment_equals_several_segments(runs) -> None:
    whole, split = runs("shared_noise", 16), runs("shared_noise", 5)
    assert (whole.segments, split.segments) == (1, 3)
    for a, b in zip(whole.result.frames, split.result.frames, strict=True):
        # the engine's float round-off between batch sizes: at most one uint8 level (docs/inpainter-engine.md)
        assert int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1
    key = [[(r.index, r.seed, r.crop_region, r.upscaled_size) for r in frame] for frame in whole.result.frame_reports]
    assert key == [[(r.index, r.seed, r.crop_region, r.upscaled_size) for r in frame]
                   for frame in split.result.frame_reports]  # fmt: skip


def test_frames_mode_is_facedetailers_batch(stages: LocalStages) -> None:
    frames = clip_frames(ClipSpec(frames=3))
    import asyncio

    from deployments.inpainter import RefineJob
    from serve_app.ingress import sampling_settings
    from serve_app.video.pipeline import detail_video

    video = asyncio.run(detail_video(frames, FAST, VideoParams(temporal="frames"), stages, make_job=RefineJob,
                                     settings=sampling_settings(FAST)))  # fmt: skip
    batch = stages.detail(frames, FAST)
    for a, b in zip(video.frames, batch.images, strict=True):
        assert int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1
    assert [[r.seed for r in frame] for frame in video.frame_reports] == [
        [s.seed for s in item.segments] for item in batch.per_image
    ]


def test_shared_noise_flickers_less_than_frame_by_frame(runs) -> None:
    frames, shared = runs("frames"), runs("shared_noise")
    assert shared.flicker < frames.flicker, (shared.flicker, frames.flicker)


def test_latent_blend_samples_frame_after_frame_from_the_previous_result(runs) -> None:
    plain, blended = runs("shared_noise"), runs("shared_noise", 16, 0.5)
    assert blended.segments == SPEC.frames, "one frame at a time: frame k needs frame k − 1's latent"
    assert [t.seed for t in blended.tracks] == [t.seed for t in plain.tracks]
    first = [np.array_equal(a, b) for a, b in zip(plain.result.frames, blended.result.frames, strict=True)]
    assert first[0] and not any(first[1:]), "frame 0 has no previous latent; every later frame is pulled"


def test_video_limits_are_checked_from_the_container(clip: bytes) -> None:
    info = probe_video(clip)
    check_video_info(info, Limits())
    for limits, name in [
        (Limits(max_video_seconds=0.5), "max_video_seconds"),
        (Limits(max_video_frames=5), "max_video_frames"),
        (Limits(max_video_pixels=160 * 120), "max_video_pixels"),
    ]:
        with pytest.raises(LimitExceededError) as caught:
            check_video_info(info, limits)
        assert caught.value.limit == name
        assert caught.value.details()[0]["field"] == "video"
