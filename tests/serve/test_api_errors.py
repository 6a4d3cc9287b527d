"""Bad input is a fast 4xx in one error shape, never a 5xx; every error carries the request id.

The ingress's real HTTP app in-process with stub deployments (tests/serve/stub_app.py): what is
checked is the request handling itself. Each case of issue 19's hostile-user findings is here.
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from tests.serve.stub_app import ingress_app

SMALL = {"steps": 2, "guide_size": 64, "max_size": 128}


def png(size: tuple[int, int] = (96, 96)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served():
    with ingress_app() as (app, stubs):
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, stubs


@pytest.fixture
def client(served):
    return served[0]


@pytest.fixture
def stubs(served):
    for stub in served[1].values():
        for counter in ("calls", "refined"):
            if hasattr(stub, counter):
                setattr(stub, counter, 0)
    return served[1]


def detail(client, params: dict, route: str = "/v1/detail", **kwargs):
    files = {"image": ("face.png", png(), "image/png")}
    return client.post(route, files=files, data={"params": json.dumps(params)}, **kwargs)


def assert_error_shape(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "status", "request_id", "details"}
    assert body["status"] == status and isinstance(body["details"], list)
    assert body["request_id"] == response.headers["x-request-id"]
    return body


# ---- 1. work bounded before it starts ---------------------------------------------------------


def test_an_unsampler_of_10000_steps_is_a_fast_422_before_any_model_work(client, stubs):
    started = time.perf_counter()
    response = detail(client, {"steps": 1, "detailer_hooks": [{"type": "unsampler", "steps": 10000}]})
    body = assert_error_shape(response, 422)
    assert time.perf_counter() - started < 2
    assert body["details"][0]["field"] == "detailer_hooks.0.steps"
    assert body["details"][0]["limit"] == "limits.max_steps"
    assert stubs["detector"].calls == 0 and stubs["inpainter"].refined == 0


def test_black_patch_retries_count_in_the_work_limit(client, stubs):
    retry = {"type": "black_patch_retry", "mean_thresh": 255, "var_thresh": 255, "max_retries": 10}
    params = {"steps": 150, "cycle": 3, "guide_size": 1024, "max_size": 1024, "detailer_hooks": [retry]}
    body = assert_error_shape(detail(client, params), 422)
    assert body["details"][0]["limit"] == "limits.max_work_units"
    assert "detailer_hooks" in [item["field"] for item in body["details"]]
    assert stubs["detector"].calls == 1 and stubs["inpainter"].refined == 0  # refused after planning


def test_a_300_kb_prompt_is_refused_on_arrival(client, stubs):
    started = time.perf_counter()
    body = assert_error_shape(detail(client, {**SMALL, "positive": "a photo of a face, " * 16_000}), 422)
    assert time.perf_counter() - started < 2
    assert body["details"] == [
        {"field": "positive", "message": body["error"], "limit": "limits.max_prompt_chars", "limit_value": 20000,
         "requested": 304_000}
    ]  # fmt: skip
    assert stubs["detector"].calls == 0


def test_prompt_tokens_over_the_limit_are_refused_before_detection(client, stubs):
    body = assert_error_shape(detail(client, {**SMALL, "positive": "face " * 800}), 422)
    assert body["details"][0]["limit"] == "limits.max_prompt_tokens" and body["details"][0]["field"] == "positive"
    body = assert_error_shape(detail(client, {**SMALL, "negative": " BREAK ".join(["x"] * 11)}), 422)
    assert "11 windows" in body["error"] and stubs["detector"].calls == 0


def test_a_body_over_the_budget_is_refused_from_its_declared_length():
    """The JSON path once took ~160 MB; the budget is the images' base64, a workflow and 1 MB."""
    with ingress_app({"max_upload_bytes": 1024 * 1024, "max_batch_images": 1}) as (app, _):
        with TestClient(app, raise_server_exceptions=False) as client:
            content = b'{"params": {"positive": "' + b"x" * (8 * 1024 * 1024) + b'"}}'
            body = assert_error_shape(client.post("/v1/detail", content=content,
                                                  headers={"content-type": "application/json"}), 413)  # fmt: skip
            assert "exceeds the limit of" in body["error"]


def test_a_body_without_content_length_is_cut_off_at_the_budget():
    with ingress_app({"max_upload_bytes": 1024 * 1024, "max_batch_images": 1}) as (app, _):
        with TestClient(app, raise_server_exceptions=False) as client:

            def chunks():
                yield b'{"image": "'
                for _ in range(64):
                    yield b"A" * (128 * 1024)

            response = client.post("/v1/detail", content=chunks(), headers={"content-type": "application/json"})
            body = assert_error_shape(response, 413)
            assert "exceeds the limit" in body["error"]


@pytest.mark.parametrize("where", ["json params", "form params", "json workflow", "form workflow", "hooks text"])
def test_json_nested_10000_deep_is_a_422_everywhere(client, where):
    deep = "[" * 10_000 + "]" * 10_000
    image = ("face.png", png(), "image/png")
    if where == "json params":
        response = client.post("/v1/detail", content=f'{{"image": "x", "params": {deep}}}',
                               headers={"content-type": "application/json"})  # fmt: skip
    elif where == "json workflow":
        response = client.post("/v1/detail", content=f'{{"image": "x", "workflow": {deep}}}',
                               headers={"content-type": "application/json"})  # fmt: skip
    elif where == "form params":
        response = client.post("/v1/detail", files={"image": image}, data={"params": deep})
    elif where == "form workflow":
        response = client.post("/v1/detail", files={"image": image}, data={"workflow": deep})
    else:
        response = client.post("/v1/detail", files={"image": image}, data={"detailer_hooks": deep})
    body = assert_error_shape(response, 422)
    assert "nested deeper than the limit of 64" in body["error"]


def test_json_nested_10000_deep_on_workflow_import_is_a_json_422(client):
    deep = "[" * 10_000 + "]" * 10_000
    for content in (deep, f'{{"workflow": {deep}}}', json.dumps({"workflow": deep})):
        body = assert_error_shape(
            client.post("/v1/workflow/import", content=content, headers={"content-type": "application/json"}), 422
        )
        assert "nested deeper" in body["error"]


# ---- 3. never a 5xx for a client's mistake ----------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"steps": 10000}, "steps"),  # over the limit
        ({"model": "no-such-checkpoint"}, "model"),
        ({"sampler_name": "no_such_sampler"}, "sampler_name"),
        ({"bbox_detector": "nope"}, "bbox_detector"),
        ({"detailer_hooks": [{"type": "unsampler", "sampler_name": "no_such"}]}, None),  # a hook it cannot run
        ({"controlnet": {"name": "not-configured"}}, "controlnet.name"),
        ({"positive": "face " * 800}, "positive"),  # prompt tokens
        ({"positive": "<lora:../../etc/passwd>"}, None),  # a LoRA name leaving its folder
        ({"positive": "embedding:foo"}, None),  # an embedding we cannot load as ComfyUI would
        ({"use_segm": True}, "use_segm"),  # no segm detector configured
        ({"denoise": 7}, "denoise"),
    ],
)
def test_the_stream_answers_a_json_4xx_before_streaming(client, stubs, params, field):
    response = detail(client, {**SMALL, **params}, route="/v1/detail/stream")
    body = assert_error_shape(response, 422)
    if field is not None:
        assert field in [item.get("field") for item in body["details"]], body
    assert stubs["detector"].calls == 0  # judged before detection


def test_a_server_fault_is_a_500_without_exception_text_and_its_id_is_in_the_log(caplog):
    with ingress_app() as (app, stubs):

        def broken(*args, **kwargs):
            raise RuntimeError("secret detail at /srv/models/inpainter/unet.safetensors")

        stubs["inpainter"].refine = broken
        with TestClient(app, raise_server_exceptions=False) as client:
            with caplog.at_level(logging.INFO, logger="ray.serve"):
                response = detail(client, SMALL, headers={"X-Request-ID": "trace-me-42"})
                stream = detail(client, SMALL, route="/v1/detail/stream")
    body = assert_error_shape(response, 500)
    assert body["request_id"] == "trace-me-42" and "secret" not in response.text and "/srv" not in response.text
    assert body["error"].startswith("internal error")
    logged = [record for record in caplog.records if "trace-me-42" in record.getMessage()]
    assert logged and any(record.exc_info for record in logged)  # the traceback, under the id
    assert stream.status_code == 200 and "event: error" in stream.text  # after the stream started
    event = json.loads(stream.text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
    assert event["status"] == 500 and "secret" not in stream.text and event["request_id"]


def test_every_error_names_its_request_and_is_logged(client, caplog):
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        response = client.get("/v1/nothing-here")
    body = assert_error_shape(response, 404)
    assert any(body["request_id"] in record.getMessage() for record in caplog.records)
    body = assert_error_shape(client.delete("/v1/info"), 405)
    assert body["error"] == "Method Not Allowed"
    body = assert_error_shape(client.post("/v1/detail", content=b"x", headers={"content-type": "text/plain"}), 415)
    body = assert_error_shape(client.post("/v1/detail?format=gif", files={"image": ("a.png", png(), "image/png")}), 422)
    assert body["details"][0]["field"] == "format"
    # a request id the client sends is kept (the same id in its logs and ours); an unusable one is replaced
    assert client.get("/v1/info", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert client.get("/v1/info", headers={"X-Request-ID": "has space"}).headers["x-request-id"] != "has space"


def test_info_shows_configured_names_and_references_not_server_paths(client):
    text = client.get("/v1/info").text
    info = json.loads(text)
    assert "/srv/" not in text  # the stub models report resolved paths under /srv/models
    assert info["models"]["detector"] == {"model": "stub://detector", "model_path": ".../detector.onnx"}
    assert info["limits"]["max_prompt_tokens"] == 750


def test_a_workflow_import_error_is_the_json_shape(client):
    body = assert_error_shape(client.post("/v1/workflow/import", json={"workflow": {"1": {"x": 1}}}), 422)
    assert body["details"][0]["field"] == "workflow"
    response = client.post("/v1/workflow/import", content=b"not json", headers={"content-type": "application/json"})
    assert assert_error_shape(response, 422)["details"][0]["field"] == "body"
