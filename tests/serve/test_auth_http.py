"""API keys over HTTP on a served app (tests/serve/conftest.py ``auth_instance``: sim:// models, two
ingress replicas, keys in a key file): 401/403/429 with their headers, public routes, the quota
ledger shared by the replicas, crops given back on every exit (success, 503, timeout, client gone),
rotation without a restart, the OpenAPI security, and the clients with a key.

The session's other apps have no ``auth``: they are open exactly as before (checked here too).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from deployments.testing.video_clip import ClipSpec, clip_frames, encode_clip
from facedetailer_client import FaceDetailerClient, ServiceError

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

QUICK = {"steps": 2, "guide_size": 128, "max_size": 256}  # a 256² crop per face: 0.5 work units per face


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def four_faces() -> bytes:
    """Texture everywhere: the simulated detector finds a face in each cell of its 2×2 grid."""
    return png(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))


def one_face() -> bytes:
    """Texture in one cell only (flat cells score 0.5, not above the default threshold)."""
    image = np.full((256, 256, 3), 128, np.uint8)
    image[:128, :128] = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    return png(image)


@pytest.fixture(scope="module")
def auth(auth_instance):
    return auth_instance


@pytest.fixture(scope="module")
def http(auth):
    with httpx.Client(base_url=auth["url"], timeout=120, trust_env=False) as client:
        yield client


def bearer(auth, key_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {auth['keys'][key_id]}"}


def detail(http, headers: dict | None, image: bytes | None = None, params: dict | None = None,
           route: str = "/v1/detail", timeout: float = 120) -> httpx.Response:  # fmt: skip
    files = {"image": ("image.png", image or one_face(), "image/png")}
    data = {"params": json.dumps({**QUICK, **(params or {})})}
    return http.post(route, files=files, data=data, headers=headers or {}, timeout=timeout)


def usage(http, auth, key_id: str) -> dict:
    answer = http.get("/v1/stats", headers=bearer(auth, "admin"))
    assert answer.status_code == 200, answer.text
    stats = answer.json()["auth"]
    assert stats["ledger"] == "shared", "every ingress replica counts on the deployment's one ledger"
    return stats["keys"].get(key_id, {"requests_last_minute": 0, "crops_in_flight": 0, "work_units_last_hour": 0})


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def in_background(function: Callable[[], httpx.Response]) -> tuple[threading.Thread, list]:
    """Run a request in a thread; its answer (or the exception it raised) lands in the list."""
    box: list = []

    def run() -> None:
        try:
            box.append(function())
        except Exception as error:  # e.g. the client's own timeout
            box.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_401_without_a_valid_key_and_403_without_the_scope(http, auth):
    for headers in (None, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic b3Blbg=="}):
        for route in ("/v1/detail", "/v1/detail/stream"):
            answer = detail(http, headers, route=route)
            assert answer.status_code == 401, (route, answer.text)
            assert answer.headers["www-authenticate"].startswith('Bearer realm="facedetailer"')
            assert set(answer.json()) >= {"error"} and "API key" in answer.json()["error"]
    assert 'error="invalid_token"' in detail(http, {"Authorization": "Bearer not-a-key"}).headers["www-authenticate"]
    answer = http.get("/v1/stats", headers=bearer(auth, "open"))
    assert answer.status_code == 403 and "lacks the 'admin' scope" in answer.json()["error"]
    assert 'error="insufficient_scope", scope="admin"' in answer.headers["www-authenticate"]
    assert http.get("/v1/stats").status_code == 401
    workflow = {"workflow": {"1": {"class_type": "FaceDetailer", "inputs": {"steps": 7}}}}
    assert http.post("/v1/workflow/import", json=workflow).status_code == 401
    imported = http.post("/v1/workflow/import", json=workflow, headers=bearer(auth, "open"))
    assert imported.status_code == 200 and imported.json()["params"]["steps"] == 7


def test_the_video_routes_need_a_key_and_count_against_its_quotas(http, auth):
    spec = ClipSpec(frames=2, width=160, height=120, audio=False)  # within the auth app's 6 s deadline
    clip = encode_clip(clip_frames(spec), spec)

    def post(route: str, headers: dict) -> httpx.Response:
        return http.post(route, files={"video": ("clip.mp4", clip, "video/mp4")}, headers=headers,
                         data={"params": json.dumps({**QUICK, "steps": 1, "bbox_crop_factor": 2.0})})  # fmt: skip

    for route in ("/v1/detail/video", "/v1/detail/video/stream"):
        refused = post(route, {})
        assert refused.status_code == 401 and "API key" in refused.json()["error"], (route, refused.text)
    before = usage(http, auth, "video")
    answer = post("/v1/detail/video?format=json", bearer(auth, "video"))
    # admitted under the key (a slow machine may still end it at the auth app's 6 s deadline: 504)
    assert answer.status_code in (200, 504), answer.text
    assert usage(http, auth, "video")["requests_last_minute"] == before["requests_last_minute"] + 1
    assert usage(http, auth, "video")["crops_in_flight"] == 0, "the video's crops are given back on every exit"


def test_public_routes_stay_open_and_info_tells_a_key_holder_its_quotas(http, auth):
    assert http.get("/healthz").status_code == 200, "Kubernetes probes send no key"
    assert http.get("/").status_code == 200 and http.get("/web/app.js").status_code == 200
    info = http.get("/v1/info")
    assert info.status_code == 200 and info.json()["auth"] == {"required": True, "scheme": "Bearer", "key": None}
    mine = http.get("/v1/info", headers=bearer(auth, "rpm")).json()["auth"]["key"]
    assert mine["id"] == "rpm" and mine["scopes"] == ["detail"] and mine["quotas"]["requests_per_minute"] == 2
    assert auth["keys"]["rpm"] not in json.dumps(mine), "the key itself is never echoed"


def test_a_valid_key_details_and_the_stream_works(http, auth):
    answer = detail(http, bearer(auth, "open"), four_faces(), route="/v1/detail?format=json")
    assert answer.status_code == 200, answer.text
    assert answer.json()["faces_refined"] == 4
    with http.stream("POST", "/v1/detail/stream", files={"image": ("i.png", one_face(), "image/png")},
                     data={"params": json.dumps(QUICK)}, headers=bearer(auth, "admin")) as stream:  # fmt: skip
        assert stream.status_code == 200
        events = [line[7:] for line in stream.iter_lines() if line.startswith("event: ")]
    assert [event for event in events if event not in ("plan", "progress")] == ["face", "result"]


def test_requests_per_minute_over_both_replicas_is_a_429_with_the_right_retry_after(http, auth):
    started = time.monotonic()
    statuses = [detail(http, bearer(auth, "rpm")).status_code for _ in range(2)]
    refused = detail(http, bearer(auth, "rpm"), route="/v1/detail/stream")
    assert statuses == [200, 200] and refused.status_code == 429, refused.text
    retry_after = int(refused.headers["retry-after"])
    assert 60 - (time.monotonic() - started) - 1 <= retry_after <= 60
    body = refused.json()
    assert "requests_per_minute quota of 2 reached" in body["error"]
    assert body["details"][0]["quota"] == "requests_per_minute" and body["details"][0]["retry_after_s"] == retry_after
    assert detail(http, bearer(auth, "open")).status_code == 200, "other keys are not affected"
    assert usage(http, auth, "rpm")["requests_last_minute"] == 2


def test_concurrent_crops_are_refused_while_held_and_given_back_after_success(http, auth):
    headers = bearer(auth, "crops")
    long = {"steps": 15}  # 4 faces × 15 steps × 50 ms, one crop at a time: about 3 s
    thread, box = in_background(lambda: detail(http, headers, four_faces(), long))
    wait_for(lambda: usage(http, auth, "crops")["crops_in_flight"] == 4, 30, "the first request's lease")
    for route in ("/v1/detail", "/v1/detail/stream"):
        refused = detail(http, headers, route=route)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
        assert refused.json()["details"][0]["quota"] == "concurrent_crops"
    thread.join(60)
    assert box[0].status_code == 200, box[0].text
    assert usage(http, auth, "crops")["crops_in_flight"] == 0
    assert detail(http, headers, four_faces()).status_code == 200


def test_work_units_per_hour_429_and_a_request_larger_than_the_quota_is_a_422(http, auth):
    headers = bearer(auth, "units")  # 3 units per hour; 4 faces × 2 steps × 256²/512² = 2 units
    too_big = detail(http, headers, four_faces(), {"steps": 20})
    assert too_big.status_code == 422 and "over the key's work_units_per_hour quota of 3" in too_big.json()["error"]
    assert detail(http, headers, four_faces()).status_code == 200
    refused = detail(http, headers, four_faces())
    assert refused.status_code == 429 and 3500 <= int(refused.headers["retry-after"]) <= 3600, refused.text
    assert usage(http, auth, "units")["work_units_last_hour"] == pytest.approx(2.0)


def test_crops_are_given_back_on_a_503_with_the_units_refunded(http, auth):
    """A full inpainter queue (one crop at a time, three waiting) is a 503: the key keeps nothing."""
    apart = {"bbox_crop_factor": 1.0}  # crops that do not overlap: the four faces go in one inpainter call
    before = usage(http, auth, "crops")
    filler, box = in_background(lambda: detail(http, bearer(auth, "open"), four_faces(), {"steps": 15, **apart}))

    def queued_crops() -> int:
        return http.get("/v1/stats", headers=bearer(auth, "admin")).json()["inpainter"]["queued_crops"]

    wait_for(lambda: queued_crops() == 3, 30, "the filler's crops in the engine: one sampled, three waiting")
    refused = detail(http, bearer(auth, "crops"), four_faces(), apart)
    assert refused.status_code == 503 and "queue is full" in refused.json()["error"], refused.text
    after = usage(http, auth, "crops")
    assert after["crops_in_flight"] == 0
    assert after["work_units_last_hour"] == pytest.approx(before["work_units_last_hour"]), "refunded"
    filler.join(60)
    assert box[0].status_code == 200


def test_crops_are_given_back_after_a_timeout_and_when_the_client_leaves(http, auth):
    headers = bearer(auth, "crops")
    # the client leaves after 2 s of a request that would run 6 s (4 crops × 30 steps × 50 ms)
    leaving, box = in_background(lambda: detail(http, headers, four_faces(), {"steps": 30}, timeout=2.0))
    wait_for(lambda: usage(http, auth, "crops")["crops_in_flight"] == 4, 10, "the lease of the request")
    leaving.join(30)
    assert isinstance(box[0], httpx.ReadTimeout)
    released_after = wait_for(lambda: usage(http, auth, "crops")["crops_in_flight"] == 0, 10, "released")
    assert released_after < 3, "released when the client left, not when the request would have ended"

    def stream_then_leave() -> int:  # the same on the stream: the client closes it while the crops run
        files = {"image": ("i.png", four_faces(), "image/png")}
        data = {"params": json.dumps({**QUICK, "steps": 30})}
        with http.stream("POST", "/v1/detail/stream", files=files, data=data, headers=headers) as stream:
            wait_for(lambda: usage(http, auth, "crops")["crops_in_flight"] == 4, 10, "the stream's lease")
            return stream.status_code

    assert stream_then_leave() == 200
    released_after = wait_for(lambda: usage(http, auth, "crops")["crops_in_flight"] == 0, 10, "released")
    assert released_after < 3, "released when the stream's client left"
    # limits.request_timeout_s = 6: a 7 s request is a 504, and its crops come back
    answer = detail(http, headers, params={"steps": 140})
    assert answer.status_code == 504, answer.text
    assert usage(http, auth, "crops")["crops_in_flight"] == 0


def test_a_removed_key_is_refused_within_seconds_without_a_restart(http, auth):
    headers = bearer(auth, "rotate")
    assert detail(http, headers).status_code == 200
    path = auth["keys_file"]
    document = yaml.safe_load(path.read_text())
    kept = [entry for entry in document["keys"] if entry["id"] != "rotate"]
    partial = path.with_name("keys.yaml.partial")
    partial.write_text(yaml.safe_dump({"keys": kept}))
    partial.replace(path)  # as a secret update swaps its files: at once
    removed_at = time.monotonic()
    # both replicas: a few requests until every one of them is refused
    wait_for(lambda: all(detail(http, headers).status_code == 401 for _ in range(4)), 15, "the key refused")
    assert time.monotonic() - removed_at < 10
    assert detail(http, bearer(auth, "open")).status_code == 200, "the other keys stay"


def test_the_openapi_schema_documents_the_keys_only_where_they_are_required(http, serve_instance):
    schema = http.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["ApiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    paths = schema["paths"]
    assert paths["/v1/detail"]["post"]["security"] == [{"ApiKey": ["detail"]}]
    assert paths["/v1/detail/stream"]["post"]["security"] == [{"ApiKey": ["detail"]}]
    assert paths["/v1/workflow/import"]["post"]["security"] == [{"ApiKey": ["detail"]}]
    assert paths["/v1/stats"]["get"]["security"] == [{"ApiKey": ["admin"]}]
    for path in ("/healthz", "/v1/info"):
        assert "security" not in paths[path]["get"], path
    responses = paths["/v1/detail"]["post"]["responses"]
    assert {"401", "403", "429"} <= set(responses)
    assert "Retry-After" in responses["429"]["headers"] and "WWW-Authenticate" in responses["401"]["headers"]
    assert responses["401"]["content"]["application/json"]["schema"]["required"] == ["error"]
    open_schema = httpx.get(serve_instance["url"] + "/openapi.json", trust_env=False).json()
    assert "securitySchemes" not in open_schema.get("components", {}), "auth off: no keys in the schema"
    assert "security" not in open_schema["paths"]["/v1/detail"]["post"]
    assert "401" not in open_schema["paths"]["/v1/detail"]["post"]["responses"]


def test_the_open_app_is_unchanged_without_auth(serve_instance):
    with httpx.Client(base_url=serve_instance["url"], timeout=60, trust_env=False) as open_http:
        stats = open_http.get("/v1/stats")
        assert stats.status_code == 200 and "auth" not in stats.json()
        assert "auth" not in open_http.get("/v1/info").json()
        assert open_http.post("/v1/workflow/import", json={"workflow": {}}).status_code == 422  # not 401


def test_the_python_client_the_cli_and_the_comfyui_node_send_their_key(http, auth, tmp_path, monkeypatch):
    from serve_app.cli import main
    from tests.serve.test_clients import load_pack

    monkeypatch.delenv("FACEDETAILER_API_KEY", raising=False)
    with FaceDetailerClient(auth["url"]) as client, pytest.raises(ServiceError) as refused:
        client.detail(one_face(), QUICK)
    assert refused.value.status_code == 401
    with FaceDetailerClient(auth["url"], api_key=auth["keys"]["open"]) as client:
        assert client.detail(one_face(), QUICK).faces_refined == 1
    image = tmp_path / "one.png"
    image.write_bytes(one_face())
    main(["detail", str(image), "-o", str(tmp_path / "out"), "--url", auth["url"], "--api-key", auth["keys"]["open"],
          "--param", "steps=2", "--param", "guide_size=128", "--param", "max_size=256"])  # fmt: skip
    assert (tmp_path / "out" / "one.png").is_file()
    import torch

    node = load_pack().NODE_CLASS_MAPPINGS["FaceDetailerRayServe"]()
    frames = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32)[None] / 255.0)
    with pytest.raises(ServiceError, match="API key"):
        node.doit(frames, auth["url"], **QUICK)
    monkeypatch.setenv("FACEDETAILER_API_KEY", auth["keys"]["open"])  # ComfyUI's environment
    result, refined, *_ = node.doit(frames, auth["url"], **QUICK)
    assert result.shape == frames.shape and len(refined) == 1
