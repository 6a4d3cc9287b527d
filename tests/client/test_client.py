"""The Python client against scripted HTTP answers (httpx.MockTransport): retries, errors, stream, requests.

A fake clock advanced by the client's own sleeps makes the retry timing exact and instant.
The client against the real served app is in tests/serve/test_clients.py.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from facedetailer_client import (
    AsyncFaceDetailerClient,
    DetailResult,
    FaceDetailerClient,
    FaceEvent,
    RetryBudgetExceeded,
    RetryPolicy,
    ServiceError,
    parse_retry_after,
)

PNG = np.full((4, 6, 3), 200, np.uint8)


def png_b64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


SEGMENT = {
    "index": 0, "bbox": [1.5, 2, 3, 4], "crop_region": [0, 0, 6, 4], "confidence": 0.9, "label": "face",
    "seed": 2**64 - 1, "upscale": 2.0, "upscaled_size": [12, 8], "skipped": False, "skip_reason": None, "prompt": "",
}  # fmt: skip
RESULT = {
    "image": png_b64(PNG), "images": [png_b64(PNG)], "mask": png_b64(np.zeros((4, 6), np.uint8)),
    "masks": [png_b64(np.zeros((4, 6), np.uint8))], "cropped_refined": [png_b64(PNG)],
    "cropped_enhanced_alpha": [png_b64(np.zeros((4, 6, 4), np.uint8))], "cnet_images": [],
    "segments": [[SEGMENT]], "faces_detected": 1, "faces_refined": 1, "timings": {"detect": 0.1},
    "detailer_pipe": {"params": {"steps": 2}},
}  # fmt: skip


class Script:
    """Answers requests in order; records each request and the client's sleeps on a fake clock."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []
        self.now = 1000.0

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def clock(self) -> float:
        return self.now

    def client(self, **kwargs) -> FaceDetailerClient:
        return FaceDetailerClient(
            "http://service", transport=httpx.MockTransport(self.handler), sleep=self.sleep, clock=self.clock, **kwargs
        )

    def async_client(self, **kwargs) -> AsyncFaceDetailerClient:
        return AsyncFaceDetailerClient(
            "http://service",
            transport=httpx.MockTransport(self.handler),
            sleep=self.async_sleep,
            clock=self.clock,
            **kwargs,
        )


def busy(status: int = 429, retry_after: str | None = "2") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, json={"error": "busy: 64 requests in progress; retry"}, headers=headers)


def ok() -> httpx.Response:
    return httpx.Response(200, json=RESULT)


def test_429_is_retried_after_the_wait_the_service_asks_for():
    script = Script(busy(429, "2"), busy(503, "3"), ok())
    with script.client() as client:
        result = client.detail(b"png bytes", {"steps": 2})
    assert script.sleeps == [2.0, 3.0]
    assert len(script.requests) == 3
    assert isinstance(result, DetailResult) and result.faces_refined == 1
    assert np.array_equal(result.array(result.image), PNG)
    [segment] = result.segments[0]
    assert segment.seed == 2**64 - 1 and segment.bbox == (1.5, 2.0, 3.0, 4.0) and segment.upscaled_size == (12, 8)


def test_without_retry_after_the_waits_back_off():
    script = Script(busy(503, None), busy(503, None), busy(503, None), ok())
    with script.client(retry=RetryPolicy(backoff_s=0.5)) as client:
        client.detail(b"x")
    assert script.sleeps == [0.5, 1.0, 2.0]


def test_a_wait_beyond_the_budget_gives_up_at_once():
    script = Script(busy(429, "30"))
    with script.client(retry=RetryPolicy(budget_s=10)) as client, pytest.raises(RetryBudgetExceeded) as error:
        client.detail(b"x")
    assert script.sleeps == [], "no pointless sleep"
    assert error.value.status_code == 429 and "busy" in error.value.message and error.value.retry_after == 30


def test_the_budget_counts_all_waits_and_attempts_are_capped():
    script = Script(*[busy(429, "4") for _ in range(10)])
    with script.client(retry=RetryPolicy(budget_s=10)) as client, pytest.raises(RetryBudgetExceeded):
        client.detail(b"x")
    assert script.sleeps == [4.0, 4.0], "a third wait would end 12 s after the start"
    capped = Script(*[busy(503, "0") for _ in range(10)])
    with capped.client(retry=RetryPolicy(max_attempts=3)) as client, pytest.raises(RetryBudgetExceeded):
        client.detail(b"x")
    assert len(capped.requests) == 3


def test_client_errors_are_not_retried_and_name_their_fields():
    answer = httpx.Response(
        422,
        json={
            "error": "invalid parameters: denoise: Input should be less than or equal to 1",
            "status": 422,
            "request_id": "5f2c0a",
            "details": [{"field": "denoise", "message": "Input should be less than or equal to 1"}],
        },
        headers={"X-Request-ID": "5f2c0a"},
    )
    script = Script(answer)
    with script.client() as client, pytest.raises(ServiceError) as error:
        client.detail(b"x", {"denoise": 2})
    assert not isinstance(error.value, RetryBudgetExceeded)
    assert error.value.status_code == 422 and error.value.fields == ["denoise"]
    assert "less than or equal to 1" in str(error.value)
    assert error.value.request_id == "5f2c0a" and "(request 5f2c0a)" in str(error.value)
    assert len(script.requests) == 1


def test_an_answer_that_is_not_the_error_shape_still_gives_the_request_id_of_its_header():
    script = Script(httpx.Response(502, text="Bad Gateway", headers={"X-Request-ID": "from-proxy"}))
    with script.client(retry=RetryPolicy(max_attempts=1)) as client, pytest.raises(ServiceError) as error:
        client.detail(b"x")
    assert error.value.status_code == 502 and error.value.request_id == "from-proxy"


def test_unreachable_service_is_retried_and_timeouts_are_not():
    script = Script(httpx.ConnectError("refused"), ok())
    with script.client(retry=RetryPolicy(backoff_s=0.25)) as client:
        assert client.detail(b"x").faces_detected == 1
    assert script.sleeps == [0.25]
    slow = Script(httpx.ReadTimeout("timed out"))
    with slow.client() as client, pytest.raises(httpx.ReadTimeout):
        client.detail(b"x")
    assert len(slow.requests) == 1, "a slow answer is not sent twice"


def test_timeouts_reach_httpx():
    with FaceDetailerClient("http://service", timeout=httpx.Timeout(7.0, connect=2.0)) as client:
        assert client._http.timeout.read == 7.0 and client._http.timeout.connect == 2.0
    with FaceDetailerClient("http://service") as client:
        assert client._http.timeout.connect == 10.0 and client._http.timeout.read == 900.0


def test_retry_after_as_an_http_date():
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 7, usegmt=True), now=now) == pytest.approx(7)
    assert parse_retry_after("5") == 5.0 and parse_retry_after("junk") is None and parse_retry_after(None) is None
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0


def test_the_request_carries_images_params_and_workflow():
    script = Script(ok())
    with script.client() as client:
        client.detail([PNG, PNG.astype(np.float32) / 255], {"seed": 2**64 - 1}, workflow={"1": {}}, workflow_node=8)
    request = script.requests[0]
    assert request.url.path == "/v1/detail" and request.url.params["format"] == "json"
    body = request.content
    assert body.count(b'name="image"') == 2
    assert b'{"seed": 18446744073709551615}' in body, "big seeds stay exact"
    assert b'name="workflow"' in body and b'name="workflow_node"' in body


def sse_body(*events: tuple[str, dict]) -> bytes:
    frames = [b": keep-alive\n\n"]
    frames += [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]
    return b"".join(frames)


def test_stream_yields_faces_then_the_result():
    face = {"event": "face", "image": 0, "status": "refined", **SEGMENT}
    body = sse_body(("face", face), ("result", RESULT))
    script = Script(httpx.Response(200, content=body, headers={"content-type": "text/event-stream"}))
    with script.client() as client:
        items = list(client.stream(b"x"))
    assert isinstance(items[0], FaceEvent) and items[0].status == "refined" and items[0].segment.seed == 2**64 - 1
    assert isinstance(items[1], DetailResult) and len(items) == 2
    assert script.requests[0].url.path == "/v1/detail/stream"
    failing = Script(httpx.Response(200, content=sse_body(("error", {"status": 503, "error": "inpainter down"}))))
    with failing.client() as client, pytest.raises(ServiceError, match="inpainter down"):
        list(client.stream(b"x"))


def test_async_client_retries_and_streams():
    async def scenario():
        script = Script(busy(429, "1.5"), ok())
        async with script.async_client() as client:
            result = await client.detail(b"x")
        assert script.sleeps == [1.5] and result.faces_refined == 1
        face = {"event": "face", "image": 0, "status": "guide size reached", **SEGMENT, "skipped": True}
        streamed = Script(httpx.Response(200, content=sse_body(("face", face), ("result", RESULT))))
        async with streamed.async_client() as client:
            items = [item async for item in client.stream(b"x")]
        assert [type(item) for item in items] == [FaceEvent, DetailResult]
        assert items[0].segment.skipped
        refused = Script(busy(429, "100"))
        async with refused.async_client(retry=RetryPolicy(budget_s=5)) as client:
            with pytest.raises(RetryBudgetExceeded):
                await client.detail(b"x")

    asyncio.run(scenario())


def test_the_api_key_is_sent_as_a_bearer_token_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv("FACEDETAILER_API_KEY", raising=False)
    script = Script(ok(), ok(), ok(), ok())
    with script.client() as client:
        client.detail(b"x")
    with script.client(api_key="fdk_abc") as client:
        client.detail(b"x")
    monkeypatch.setenv("FACEDETAILER_API_KEY", "from-env")
    with script.client() as client:
        client.detail(b"x")
    with script.client(api_key="explicit") as client:
        client.detail(b"x")
    headers = [request.headers.get("authorization") for request in script.requests]
    assert headers == [None, "Bearer fdk_abc", "Bearer from-env", "Bearer explicit"]
    async_script = Script(ok())

    async def run() -> None:
        async with async_script.async_client(api_key="async-key") as client:
            await client.detail(b"x")

    asyncio.run(run())
    assert async_script.requests[0].headers["authorization"] == "Bearer async-key"


def test_401_and_403_are_not_retried_and_say_why():
    refused = httpx.Response(
        401,
        json={"error": "an API key is required: send it as 'Authorization: Bearer <key>'"},
        headers={"WWW-Authenticate": 'Bearer realm="facedetailer"'},
    )
    forbidden = httpx.Response(403, json={"error": "API key 'ci' lacks the 'admin' scope this route needs"})
    script = Script(refused, forbidden)
    with script.client() as client:
        with pytest.raises(ServiceError) as error:
            client.detail(b"x")
        assert error.value.status_code == 401 and "Authorization: Bearer" in str(error.value)
        with pytest.raises(ServiceError) as error:
            client.info()
        assert error.value.status_code == 403
    assert len(script.requests) == 2 and script.sleeps == []


def test_a_quota_429_waits_as_long_as_it_asks():
    over = httpx.Response(
        429,
        json={"error": "API key 'demo': requests_per_minute quota of 2 reached (2 requests in the last minute); "
                       "retry in 37 s", "details": [{"quota": "requests_per_minute", "retry_after_s": 37}]},
        headers={"Retry-After": "37"},
    )  # fmt: skip
    script = Script(over, ok())
    with script.client(api_key="demo-detail-key") as client:
        assert client.detail(b"x").faces_refined == 1
    assert script.sleeps == [37.0]
