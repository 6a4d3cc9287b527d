"""``POST /v1/detail/video`` and its stream on the served app, and ``facedetailer video IN OUT --url``."""

from __future__ import annotations

import io
import json

import av
import httpx
import pytest

from deployments.testing.video_clip import ClipSpec, clip_frames, encode_clip
from serve_app.video.codec import decode_video

pytestmark = [pytest.mark.ray, pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SPEC = ClipSpec(frames=6)
PARAMS = {"steps": 2, "guide_size": 64, "max_size": 256, "bbox_crop_factor": 2.0, "seed": 11}


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_clip(clip_frames(SPEC), SPEC)


@pytest.fixture(scope="module")
def client(serve_instance):
    with httpx.Client(base_url=serve_instance["url"], timeout=600, trust_env=False) as http:
        yield http


def post_video(client: httpx.Client, data: bytes, params: dict, route: str = "/v1/detail/video", **query):
    return client.post(route, params=query, files={"video": ("clip.mp4", data, "video/mp4")},
                       data={"params": json.dumps(params)})  # fmt: skip


def test_a_video_comes_back_detailed_with_its_audio_and_timestamps(client: httpx.Client, clip: bytes) -> None:
    response = post_video(client, clip, {**PARAMS, "temporal": "shared_noise"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    assert response.headers["x-tracks"] == "2" and response.headers["x-faces-refined"] == str(2 * SPEC.frames)
    assert response.headers["x-audio-copied"] == "true" and response.headers["x-video-codec"] == "libx264"
    result, source = decode_video(response.content), decode_video(clip)
    assert result.pts == source.pts
    with av.open(io.BytesIO(response.content)) as container:
        assert container.streams.audio[0].codec_context.name == "aac"


def test_the_stream_reports_frames_done_then_the_result(client: httpx.Client, clip: bytes) -> None:
    events = []
    with client.stream("POST", "/v1/detail/video/stream", files={"video": ("clip.mp4", clip)},
                       data={"params": json.dumps({**PARAMS, "segment_frames": 2})}) as response:  # fmt: skip
        assert response.status_code == 200
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    progress = [payload for name, payload in events if name == "progress"]
    assert [p["frames_done"] for p in progress] == [2, 4, 6] and progress[-1]["eta_s"] == 0
    assert all(p["frames_total"] == SPEC.frames for p in progress)
    name, result = events[-1]
    assert name == "result" and result["frames"] == SPEC.frames and result["segments"] == 3
    assert [track["seed"] for track in result["tracks"] if track["selected"]] == [11, 12]
    assert decode_video(__import__("base64").b64decode(result["video"])).pts == decode_video(clip).pts


def test_bad_video_requests_are_4xx_naming_the_problem(client: httpx.Client, clip: bytes) -> None:
    not_video = post_video(client, b"not a video at all", PARAMS)
    assert not_video.status_code == 415 and not_video.json()["details"][0]["field"] == "video"
    bad_option = post_video(client, clip, {**PARAMS, "temporal": "sometimes"})
    assert bad_option.status_code == 422 and bad_option.json()["details"][0]["field"] == "temporal"
    unknown_track = post_video(client, clip, {**PARAMS, "track_ids": [9]})
    assert unknown_track.status_code == 422 and "no track [9]" in unknown_track.json()["error"]
    no_sam = post_video(client, clip, {**PARAMS, "use_sam": True, "temporal": "tracks"})
    assert no_sam.status_code == 422 and "use_sam" in no_sam.json()["error"]


def test_a_video_over_the_frame_limit_is_a_422_before_decoding(client: httpx.Client) -> None:
    spec = ClipSpec(frames=45, width=64, height=48, audio=False)  # tests/serve/conftest.py: max_video_frames 40
    long_clip = encode_clip([frame[:48, :64] for frame in clip_frames(ClipSpec(frames=45))], spec)
    response = post_video(client, long_clip, PARAMS)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["details"][0]["field"] == "video" and body["details"][0]["limit"] == "limits.max_video_frames"


def test_the_cli_details_a_video_file_over_http(serve_instance, clip: bytes, tmp_path) -> None:
    from serve_app.cli import main

    source, target = tmp_path / "in.mp4", tmp_path / "out.mkv"
    source.write_bytes(clip)
    params = [f"--param={name}={json.dumps(value)}" for name, value in PARAMS.items()]
    main(["video", str(source), str(target), "--url", serve_instance["url"], *params, "--param", "pick_tracks=largest"])
    assert target.exists() and not list(tmp_path.glob("*.partial*"))
    with av.open(str(target)) as container:
        assert container.format.name == "matroska,webm"
        assert len(container.streams.audio) == 1
    assert len(decode_video(target.read_bytes()).frames) == SPEC.frames


def test_the_cli_details_a_video_file_through_the_handle_api(serve_instance, clip, tmp_path, monkeypatch, capsys):
    """Without --url the CLI serves its --config and streams through the handle: here the session's app
    stands in for the one ``start_serving`` would deploy (deploying a second would double the test's work)."""
    from serve_app import cli

    started = []

    def serving(config, **options):
        started.append((config, options))
        return serve_instance["handle"], 0

    monkeypatch.setattr(cli, "start_serving", serving)
    source, target = tmp_path / "in.mp4", tmp_path / "out.mov"
    source.write_bytes(clip)
    params = [f"--param={name}={json.dumps(value)}" for name, value in PARAMS.items()]
    cli.main(["video", str(source), str(target), "--config", "my.yaml", "--set", "limits.max_steps=9", *params,
              "--param", "temporal=tracks", "--param", "pick_tracks=longest"])  # fmt: skip
    assert [(str(config), options["sets"]) for config, options in started] == [("my.yaml", ["limits.max_steps=9"])]
    assert target.exists() and not list(tmp_path.glob("*.partial*"))
    with av.open(str(target)) as container:
        assert container.format.name.startswith("mov") and len(container.streams.audio) == 1
    assert decode_video(target.read_bytes()).pts == decode_video(clip).pts
    report = capsys.readouterr().err  # the video options reached the service: one track of two refined
    assert f"{SPEC.frames} frames, 1 track(s), {SPEC.frames} faces refined" in report and "audio copied" in report


def engine_stats(client: httpx.Client) -> dict:
    response = client.get("/v1/stats", timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["inpainter"]


def test_a_client_that_leaves_the_stream_cancels_the_video(client: httpx.Client, clip: bytes) -> None:
    """100 steps × 12 crops would take long; the client leaves after 3 s and the engine empties."""
    import time

    before = engine_stats(client)
    long = {**PARAMS, "steps": 100, "segment_frames": SPEC.frames}
    with pytest.raises(httpx.TimeoutException):
        with client.stream("POST", "/v1/detail/video/stream", files={"video": ("clip.mp4", clip)},
                           data={"params": json.dumps(long)}, timeout=httpx.Timeout(3.0)) as response:  # fmt: skip
            for _ in response.iter_lines():
                pass
    deadline = time.monotonic() + 120
    while True:
        stats = engine_stats(client)
        if stats["active_crops"] == 0 and stats["queued_crops"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert stats["active_crops"] == 0 and stats["queued_crops"] == 0
    assert stats["crops_cancelled"] > before["crops_cancelled"], "the video's crops left the engine"
    evaluations = stats["unet_crop_evaluations"] - before["unet_crop_evaluations"]
    assert evaluations < 2 * SPEC.frames * long["steps"], f"the crops ran {evaluations} UNet evaluations"


def test_the_handle_api_streams_progress_then_the_response(serve_instance, clip: bytes) -> None:
    handle = serve_instance["handle"].options(stream=True)
    events = list(handle.detail_video_with_progress.remote(clip, {**PARAMS, "segment_frames": 3}, None, "mov"))
    assert [e["frames_done"] for e in events if e["event"] == "progress"] == [3, 6]
    response = events[-1]["result"]
    assert response.container == "mov" and response.media_type == "video/quicktime"
    assert sum(track.selected for track in response.tracks) == 2
    assert decode_video(response.data).pts == decode_video(clip).pts
