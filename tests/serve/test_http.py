"""The served graph from configs/local-cpu.yaml over real HTTP on localhost, and through the handle.

Real face YOLO (faceghost) and LiteMedSAM on real photos; the tiny random-weight inpainter, so
refined faces are noise and the checks are on contracts: sizes, masks, counts, untouched pixels.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.testing import assets

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

SEGM_ROUTE = "/segm"  # the second app's route (tests/serve/conftest.py)
FAST = {"steps": 2, "guide_size": 128, "max_size": 256}


def png_bytes(array: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def decode(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def three_faces() -> np.ndarray:
    """Three astronauts side by side (one mirrored): a synthetic image with three real faces."""
    small = np.asarray(Image.fromarray(assets.astronaut()).resize((256, 256), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(np.concatenate([small, small[:, ::-1], small], axis=1))


def no_face() -> np.ndarray:
    ramp = np.linspace(0, 255, 320, dtype=np.float32)
    image = np.stack([np.tile(ramp, (240, 1))] * 3, axis=-1)
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def client(serve_instance):
    with httpx.Client(base_url=serve_instance["url"], timeout=600, trust_env=False) as http:
        yield http


def post_detail(client, image: np.ndarray, params: dict | None = None, *, json_format: bool = False, route: str = ""):
    files = {"image": ("image.png", png_bytes(image), "image/png")}
    data = {"params": json.dumps({**FAST, **(params or {})})}
    suffix = "?format=json" if json_format else ""
    return client.post(f"{route}/v1/detail{suffix}", files=files, data=data)


def outside_crop_regions(shape: tuple[int, ...], segments: list[dict]) -> np.ndarray:
    outside = np.ones(shape[:2], bool)
    for segment in segments:
        x1, y1, x2, y2 = segment["crop_region"]
        outside[y1:y2, x1:x2] = False
    return outside


def test_healthz_info_and_docs(client):
    health = client.get("/healthz")
    assert health.status_code == 200, health.text
    assert health.json()["deployments"] == {"detector": "ok", "sam": "ok", "inpainter": "ok"}
    info = client.get("/v1/info").json()
    assert "euler" in info["samplers"] and "normal" in info["schedulers"]
    assert info["limits"]["max_upload_bytes"] == 3_000_000
    assert info["defaults"]["guide_size"] == 384
    assert client.get("/docs").status_code == 200
    assert "/v1/detail" in client.get("/openapi.json").json()["paths"]


def test_real_photo_returns_png_of_same_size(client):
    photo = assets.zidane()
    response = post_detail(client, photo)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    result = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert result.shape == photo.shape
    assert response.headers["x-faces-refined"] == "2"
    assert not np.array_equal(result, photo)


def test_json_format_has_every_output_and_untouched_pixels(client):
    photo = assets.zidane()
    response = post_detail(client, photo, json_format=True)
    assert response.status_code == 200, response.text
    body = response.json()
    for key in ("image", "mask", "cropped_refined", "cropped_enhanced_alpha", "segments", "timings"):
        assert key in body, key
    image = decode(body["image"])
    mask = decode(body["mask"])
    assert image.shape == photo.shape and mask.shape == photo.shape[:2]
    segments = body["segments"][0]
    assert len(segments) == 2 and len(body["cropped_refined"]) == 2
    for segment in segments:
        assert set(segment) >= {"bbox", "crop_region", "confidence", "label", "seed", "upscale", "skipped"}
        assert segment["label"] == "face" and not segment["skipped"]
    assert [s["seed"] for s in segments] == [0, 1]
    assert decode(body["cropped_enhanced_alpha"][0]).shape[2] == 4
    assert {"detect", "inpaint", "blend", "pipeline"} <= set(body["timings"])
    outside = outside_crop_regions(photo.shape, segments)
    assert np.array_equal(image[outside], photo[outside]), "pixels outside every crop must be bit-identical"


def test_sam_masks_the_face(client):
    photo = assets.astronaut()
    plain = post_detail(client, photo, {"bbox_dilation": 0}, json_format=True).json()
    sam = post_detail(client, photo, {"use_sam": True, "sam_threshold": 0.5, "bbox_dilation": 0}, json_format=True)
    assert sam.status_code == 200, sam.text
    body = sam.json()
    assert "sam" in body["timings"]
    plain_mask, sam_mask = decode(plain["mask"]) > 0, decode(body["mask"]) > 0
    assert 0 < sam_mask.sum() < plain_mask.sum(), "SAM narrows the box mask to the face"
    assert not (sam_mask & ~plain_mask).any(), "SAM ∧ bbox stays inside the box"


def test_segm_detector_path_runs_through_the_graph(client):
    photo = assets.astronaut()
    response = post_detail(client, photo, {"use_segm": True}, json_format=True, route=SEGM_ROUTE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert "detect_segm" in body["timings"]
    assert len(body["segments"][0]) == 1
    # the tiny random segm model's masks are ANDed into the face box: whatever survives lies in the box
    mask = decode(body["mask"]) > 0
    x1, y1, x2, y2 = (int(v) for v in body["segments"][0][0]["crop_region"])
    assert not mask[:y1].any() and not mask[y2:].any() and not mask[:, :x1].any() and not mask[:, x2:].any()
    unavailable = post_detail(client, photo, {"use_segm": True})
    assert unavailable.status_code == 422 and "segm" in unavailable.json()["error"]


def test_cycle_two_differs_from_one(client):
    photo = assets.astronaut()
    one = post_detail(client, photo, {"cycle": 1}, json_format=True).json()
    two = post_detail(client, photo, {"cycle": 2}, json_format=True).json()
    assert not np.array_equal(decode(one["image"]), decode(two["image"]))
    again = post_detail(client, photo, {"cycle": 2}, json_format=True).json()
    assert np.array_equal(decode(two["image"]), decode(again["image"])), "same seed, same result"


def test_three_faces_three_refined_crops(client):
    image = three_faces()
    body = post_detail(client, image, json_format=True).json()
    assert body["faces_detected"] == 3 and len(body["cropped_refined"]) == 3
    assert sorted(s["seed"] for s in body["segments"][0]) == [0, 1, 2]


def test_no_face_returns_unchanged_image_and_empty_mask(client):
    image = no_face()
    response = post_detail(client, image, json_format=True)
    body = response.json()
    assert np.array_equal(decode(body["image"]), image)
    assert not decode(body["mask"]).any()
    assert body["faces_detected"] == 0
    assert decode(body["cropped_refined"][0]).shape == (64, 64, 3)
    png = post_detail(client, image)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")), image)


def test_json_body_with_base64_image_and_batch_seeds(client):
    image = assets.astronaut()
    encoded = base64.b64encode(png_bytes(image)).decode()
    payload = {"images": [encoded, encoded], "params": {**FAST, "seed": 10}}
    response = client.post("/v1/detail?format=json", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [segments[0]["seed"] for segments in body["segments"]] == [10, 11], "image k uses seed + k"
    single = client.post("/v1/detail", json={"image": encoded, **FAST})
    assert single.status_code == 200 and single.headers["content-type"] == "image/png"


def test_form_fields_carry_node_parameters(client):
    files = {"image": ("a.jpg", png_bytes(assets.astronaut(), "JPEG"), "image/jpeg")}
    data = {"steps": "2", "guide_size": "128", "max_size": "256", "seed": "42", "force_inpaint": "true"}
    body = client.post("/v1/detail?format=json", files=files, data=data).json()
    assert body["segments"][0][0]["seed"] == 42


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        ("text", 415, "not an image"),
        ("corrupt", 400, "corrupt"),
        ("too_many_bytes", 413, "bytes"),
        ("too_many_pixels", 413, "pixels"),
        ("unknown_param", 422, "no_such_param"),
        ("out_of_range", 422, "denoise"),
        ("bad_sampler", 422, "supported"),
        ("bad_scheduler", 422, "supported"),
        ("bad_format", 422, "format"),
        ("no_image", 422, "image"),
        ("bad_content_type", 415, "multipart"),
        ("bad_json", 422, "JSON"),
    ],
)
def test_bad_input_gets_a_clear_4xx(client, payload, status, needle):
    good = png_bytes(no_face())
    files = {"image": ("x.png", good, "image/png")}
    data: dict = {}
    url = "/v1/detail"
    kwargs: dict = {}
    if payload == "text":
        files = {"image": ("x.png", b"hello, this is not an image", "image/png")}
    elif payload == "corrupt":
        files = {"image": ("x.png", good[: len(good) // 2], "image/png")}
    elif payload == "too_many_bytes":
        noise = np.random.default_rng(0).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)
        files = {"image": ("x.png", png_bytes(noise), "image/png")}
    elif payload == "too_many_pixels":
        files = {"image": ("x.png", png_bytes(np.zeros((4200, 4200, 3), np.uint8)), "image/png")}
    elif payload == "unknown_param":
        data = {"params": json.dumps({"no_such_param": 1})}
    elif payload == "out_of_range":
        data = {"params": json.dumps({"denoise": 2.0})}
    elif payload == "bad_sampler":
        data = {"params": json.dumps({"sampler_name": "not_a_sampler"})}
    elif payload == "bad_scheduler":
        data = {"params": json.dumps({"scheduler": "not_a_scheduler"})}
    elif payload == "bad_format":
        url += "?format=gif"
    elif payload == "no_image":
        files = {"other": ("notes.txt", b"no image here", "text/plain")}
    elif payload == "bad_content_type":
        kwargs = {"content": b"raw", "headers": {"content-type": "text/plain"}}
    elif payload == "bad_json":
        kwargs = {"content": b"{not json", "headers": {"content-type": "application/json"}}
    if kwargs:
        response = client.post(url, **kwargs)
    else:
        response = client.post(url, files=files, data=data)
    assert response.status_code == status, response.text
    assert needle.lower() in response.json()["error"].lower()


def test_python_handle_api(serve_instance):
    from serve_app.ingress import RequestError

    handle = serve_instance["handle"]
    photo = assets.zidane()
    result = handle.detail.remote(photo, FAST).result(timeout_s=600)
    assert result.images[0].shape == photo.shape
    assert result.masks.shape == (1, *photo.shape[:2])
    assert len(result.cropped_refined) == 2
    assert [s.seed for s in result.per_image[0].segments] == [0, 1]
    batch = handle.detail.remote(np.stack([no_face(), no_face()]), {**FAST, "seed": 3}).result(timeout_s=600)
    assert batch.masks.shape == (2, 240, 320) and len(batch.images) == 2
    assert np.array_equal(batch.images[1], no_face())
    with pytest.raises(RequestError, match="denoise"):
        handle.detail.remote(photo, {"denoise": 5}).result(timeout_s=60)
    events = list(handle.options(stream=True).detail_with_progress.remote(photo, FAST, progress=False))
    assert [e["event"] for e in events] == ["face", "face", "result"]


def test_served_graph_equals_the_in_process_pipeline(serve_instance, local_cpu_config):
    """The hops change nothing: the same request through the handle and in-process agree."""
    from deployments.detector import FaceDetector
    from deployments.inpainter import Inpainter
    from facedetailer.params import FaceDetailerParams
    from serve_app.app import app_args_from_config
    from serve_app.local import LocalStages

    args = app_args_from_config(local_cpu_config)
    stages = LocalStages(
        detector=FaceDetector(args.detector.model, task=args.detector.task, device="cpu"),
        inpainter=Inpainter(args.inpainter.model, device="cpu"),
    )
    photo = assets.zidane()
    params = {**FAST, "seed": 9, "cycle": 2}
    local = stages.detail([photo], FaceDetailerParams(**params))
    served = serve_instance["handle"].detail.remote(photo, params).result(timeout_s=600)
    assert [s.crop_region for s in served.per_image[0].segments] == [
        s.crop_region for s in local.per_image[0].segments
    ]
    # float kernels may differ by thread count between processes: allow one uint8 level
    difference = np.abs(served.images[0].astype(int) - local.images[0].astype(int))
    assert difference.max() <= 1, difference.max()


# --- issue 12: hooks, named detectors, the node's list outputs ------------------------------------


def test_hooks_over_http_filter_faces_and_refuse_what_they_cannot_honour(client):
    image = three_faces()
    middle = {"type": "segs_ordered_filter", "target": "x1", "order": False, "take_start": 1, "take_count": 1}
    body = post_detail(client, image, {"detailer_hooks": [middle]}, json_format=True).json()
    [segment] = body["segments"][0]
    assert 256 <= segment["crop_region"][0] < 512 and body["faces_refined"] == 1
    assert body["detailer_pipe"]["params"]["detailer_hooks"][0]["target"] == "x1"
    # a form field carries the list as JSON text
    files = {"image": ("image.png", png_bytes(image), "image/png")}
    data = {**{k: str(v) for k, v in FAST.items()}, "detailer_hooks": json.dumps([middle])}
    assert client.post("/v1/detail?format=json", files=files, data=data).json()["faces_detected"] == 1
    refused = post_detail(client, image, {"detailer_hooks": [{"type": "unsampler", "sampler_name": "nope"}]})
    assert refused.status_code == 422 and "unsampler: sampler_name 'nope' is unknown" in refused.json()["error"]
    unknown = post_detail(client, image, {"detailer_hooks": [{"type": "face_swap"}]})
    assert unknown.status_code == 422 and "face_swap" in unknown.json()["error"]
    extra = post_detail(client, image, {"detailer_hooks": [{"type": "coreml", "size": 512}]})
    assert extra.status_code == 422 and "coreml.size" in extra.json()["error"]


def test_sampling_hooks_over_http_and_the_handle_by_their_formulas(client, serve_instance):
    """Exact identities of the reference formulas, through the served graph (euler: no sampler noise).

    - variation noise at strength 1 is (0·n(seed) + 1·n(vseed)) / 1 = n(vseed): the face is refined
      exactly as with seed = vseed (one face at position 0, so its seed is the request's);
    - a denoise schedule to 0 over 2 cycles leaves cycle 1 unsampled: the result of 1 cycle.
    """
    photo = assets.astronaut()

    def refined(params: dict) -> np.ndarray:
        body = post_detail(client, photo, params, json_format=True)
        assert body.status_code == 200, body.text
        return decode(body.json()["cropped_refined"][0])

    seed_11, seed_3 = refined({"seed": 11}), refined({"seed": 3})
    assert not np.array_equal(seed_11, seed_3)
    variation = refined({"seed": 3, "detailer_hooks": [{"type": "variation_noise", "seed": 11, "strength": 1.0}]})
    assert np.array_equal(variation, seed_11)
    handle = serve_instance["handle"]

    def through_handle(params: dict) -> np.ndarray:
        return handle.detail.remote(photo, {**FAST, **params}).result(timeout_s=600).cropped_refined[0]

    one_cycle = through_handle({"cycle": 1})
    scheduled = through_handle({"cycle": 2, "detailer_hooks": [{"type": "denoise_scheduler", "target_denoise": 0.0}]})
    assert np.array_equal(scheduled, one_cycle)
    assert not np.array_equal(through_handle({"cycle": 2}), one_cycle)


def test_each_image_without_faces_has_a_placeholder_in_every_list_over_http(client):
    encoded = base64.b64encode(png_bytes(no_face())).decode()
    body = client.post("/v1/detail?format=json", json={"images": [encoded, encoded], "params": FAST}).json()
    for key in ("cropped_refined", "cropped_enhanced_alpha", "cnet_images"):
        assert [decode(item).shape for item in body[key]] == [(64, 64, 3), (64, 64, 3)], key
        assert not any(decode(item).any() for item in body[key])


def test_named_detectors_over_http_and_the_handle(client, serve_instance):
    info = client.get(f"{SEGM_ROUTE}/v1/info").json()
    assert list(info["detectors"]) == ["face", "tiny"]
    assert info["detectors"]["tiny"]["model_path"] == ".../tiny_face_yolov8n.pt"  # a name, no server path
    assert list(client.get("/v1/info").json()["detectors"]) == ["default"]
    health = client.get(f"{SEGM_ROUTE}/healthz").json()["deployments"]
    assert {"detector:face", "detector:tiny", "segm_detector", "inpainter"} == set(health)
    photo = assets.astronaut()
    face = post_detail(client, photo, {"bbox_detector": "face"}, json_format=True, route=SEGM_ROUTE).json()
    tiny = post_detail(client, photo, {"bbox_detector": "tiny"}, json_format=True, route=SEGM_ROUTE).json()
    assert face["faces_detected"] == 1 and tiny["faces_detected"] == 0, "the random tiny model finds no face"
    unknown = post_detail(client, photo, {"bbox_detector": "hand"}, route=SEGM_ROUTE)
    assert unknown.status_code == 422 and "bbox_detector: unknown 'hand'; configured: face, tiny" in unknown.text
    from serve_app.ingress import RequestError

    handle = serve_instance["segm_handle"]
    result = handle.detail.remote(photo, {**FAST, "bbox_detector": "tiny"}).result(timeout_s=600)
    assert result.per_image[0].segments == []
    with pytest.raises(RequestError, match="sam_model"):
        handle.detail.remote(photo, {**FAST, "sam_model": "vit_b"}).result(timeout_s=60)
    # hooks through the handle: the face detector's label is "face", so a "hand" filter keeps nothing
    hands_only = {**FAST, "detailer_hooks": [{"type": "segs_label_filter", "labels": "hand"}]}
    filtered = handle.detail.remote(photo, hands_only).result(timeout_s=600)
    assert filtered.per_image[0].segments == [] and not filtered.masks.any()
    with pytest.raises(RequestError, match="unsampler: scheduler 'nope'"):
        bad = {**FAST, "cycle": 2, "detailer_hooks": [{"type": "unsampler", "scheduler": "nope"}]}
        handle.detail.remote(photo, bad).result(timeout_s=60)


# ---- issue 19: bounds, images as LoadImage loads them, errors with request ids ------------------


def test_errors_carry_the_request_id_that_serve_logs(client, serve_instance):
    """The body's request_id is the X-Request-ID Serve's proxy sends back (once) and its replica logs."""
    import ray

    files = {"image": ("x.png", png_bytes(no_face()), "image/png")}
    response = client.post("/v1/detail", files=files, data={"params": json.dumps({"steps": 10000})})
    assert response.status_code == 422
    body = response.json()
    assert response.headers.get_list("x-request-id") == [body["request_id"]]
    chosen = client.post("/v1/detail", files=files, data={"params": "{"}, headers={"X-Request-ID": "issue19-id"})
    assert chosen.status_code == 422 and chosen.json()["request_id"] == "issue19-id"
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    deadline = time.monotonic() + 20
    found: set[str] = set()
    while time.monotonic() < deadline and len(found) < 2:
        for path in logs.glob("*.log"):
            text = path.read_text(errors="replace")
            found |= {rid for rid in (body["request_id"], "issue19-id") if rid in text}
        time.sleep(0.5)
    assert found == {body["request_id"], "issue19-id"}


def test_info_names_models_without_server_paths(client, cache_dir):
    for route in ("", SEGM_ROUTE):
        text = client.get(f"{route}/v1/info").text
        for local in (str(cache_dir), "site-packages", str(Path.home()), "/tmp/"):
            assert local not in text, (route, local)


def test_the_stream_refuses_before_streaming_what_needs_no_detection(client):
    """The checkpoint's own tokenizer counts the prompt (fetched through Ray, per checkpoint)."""
    files = {"image": ("x.png", png_bytes(three_faces()), "image/png")}
    cases = [
        ("", {"steps": 10000}, "steps"),
        ("", {"model": "no-such-checkpoint"}, "model"),
        ("", {"positive": "a face " * 400}, "positive"),
        (SEGM_ROUTE, {"model": "sdxl", "negative": " BREAK ".join(["blurry"] * 11)}, "negative"),
    ]
    for route, params, field in cases:
        started = time.perf_counter()
        data = {"params": json.dumps({**FAST, **params})}
        response = client.post(f"{route}/v1/detail/stream", files=files, data=data)
        assert response.status_code == 422 and response.headers["content-type"] == "application/json", response.text
        assert field in [item["field"] for item in response.json()["details"]]
        assert time.perf_counter() - started < 10
    fine = client.post("/v1/detail/stream", files=files, data={"params": json.dumps({**FAST, "positive": "a face"})})
    assert fine.status_code == 200 and "event: result" in fine.text


def test_uploads_load_as_comfyui_loads_them(client):
    """An EXIF-rotated photo is detailed upright (its face found); a 16-bit image is scaled, not clipped."""
    upright = assets.astronaut()[:, 64:448]  # 512 high, 384 wide: a turn changes the shape
    stored = np.ascontiguousarray(np.rot90(upright, k=1))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    files = {"image": ("phone.jpg", buffer.getvalue(), "image/jpeg")}
    body = client.post("/v1/detail?format=json", files=files, data={"params": json.dumps(FAST)}).json()
    assert decode(body["image"]).shape == upright.shape and body["faces_detected"] == 1
    ramp = np.linspace(0, 65535, 320 * 240).reshape(240, 320).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    files = {"image": ("ramp.png", buffer.getvalue(), "image/png")}
    answer = client.post("/v1/detail?format=json", files=files, data={"params": json.dumps(FAST)}).json()
    assert answer["faces_detected"] == 0
    assert np.array_equal(decode(answer["image"])[..., 0], (ramp // 257).astype(np.uint8))
