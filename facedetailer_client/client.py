"""Sync and async clients of the facedetailer-serve HTTP API, over httpx.

Both send the same requests (multipart: one ``image`` file per image, ``params`` as JSON, an
optional ComfyUI ``workflow``), raise :class:`ServiceError` with the service's message for a
4xx/5xx, and retry 429/503 as :class:`RetryPolicy` says, honouring ``Retry-After``. A service
with API keys (``docs/auth.md``) gets ``api_key`` (or the ``FACEDETAILER_API_KEY`` environment
variable) as ``Authorization: Bearer <key>``; 401 and 403 are not retried.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from facedetailer_client.models import (
    DetailResult,
    FaceEvent,
    PlanEvent,
    RetryBudgetExceeded,
    ServiceError,
    StepProgress,
)
from facedetailer_client.retry import RetryPolicy, RetryState, parse_retry_after
from facedetailer_client.sse import SSEDecoder

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "FACEDETAILER_API_KEY"
# Detailing a large image on a busy service can take minutes; connecting should not.
DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=900.0, write=60.0, pool=60.0)

ImageInput = Any  # bytes (PNG/JPEG/WebP), a path, a PIL image, or an RGB array ([H, W, 3] uint8 or float 0–1)
StreamItem = PlanEvent | StepProgress | FaceEvent | DetailResult


def image_bytes(image: ImageInput) -> tuple[str, bytes, str]:
    """(file name, encoded bytes, media type) of one image input."""
    if isinstance(image, bytes | bytearray):
        return "image", bytes(image), "application/octet-stream"
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes(), "application/octet-stream"
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "image.png", buffer.getvalue(), "image/png"
    if hasattr(image, "__array__"):
        import numpy as np
        from PIL import Image

        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return "image.png", buffer.getvalue(), "image/png"
    raise TypeError(f"unsupported image input {type(image).__name__}: use bytes, a path, a PIL image or an array")


def _multipart(
    images: Sequence[ImageInput],
    params: dict[str, Any] | None,
    workflow: dict[str, Any] | str | None,
    workflow_node: str | int | None,
) -> tuple[list[tuple[str, tuple[str, bytes, str]]], dict[str, str]]:
    if not images:
        raise ValueError("at least one image is required")
    files = [("image", image_bytes(image)) for image in images]
    data = {"params": json.dumps(params or {})}
    if workflow is not None:
        data["workflow"] = workflow if isinstance(workflow, str) else json.dumps(workflow)
    if workflow_node is not None:
        data["workflow_node"] = str(workflow_node)
    return files, data


def _as_list(image: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(image, list | tuple):
        return list(image)
    return [image]


def auth_headers(api_key: str | None, headers: dict[str, str] | None = None) -> dict[str, str]:
    """``headers`` plus ``Authorization: Bearer`` with ``api_key``, else ``$FACEDETAILER_API_KEY`` (if set)."""
    merged = dict(headers or {})
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if key and not any(name.lower() == "authorization" for name in merged):
        merged["Authorization"] = f"Bearer {key.strip()}"
    return merged


def service_error(response: httpx.Response, body: bytes | None = None) -> ServiceError:
    content = response.content if body is None else body
    try:
        payload = json.loads(content)
    except ValueError:
        payload = {"error": content.decode("utf-8", "replace")[:500] or response.reason_phrase}
    message = payload.get("error", response.reason_phrase) if isinstance(payload, dict) else str(payload)
    details = payload.get("details") if isinstance(payload, dict) and isinstance(payload.get("details"), list) else None
    request_id = payload.get("request_id") if isinstance(payload, dict) else None
    return ServiceError(
        response.status_code,
        str(message),
        details,
        parse_retry_after(response.headers.get("retry-after")),
        str(request_id or response.headers.get("x-request-id") or "") or None,
    )


def _stream_fields(data: dict[str, str], progress: bool, preview_every: int) -> dict[str, str]:
    """The stream's own form fields, sent only when they differ from the service's defaults."""
    if not progress:
        data["progress"] = "false"
    if preview_every:
        data["preview_every"] = str(int(preview_every))
    return data


def _stream_item(event: str, data: Any) -> StreamItem | None:
    if event == "face":
        return FaceEvent.from_json(data)
    if event == "progress":
        return StepProgress.from_json(data)
    if event == "plan":
        return PlanEvent.from_json(data)
    if event == "result":
        return DetailResult.from_json(data)
    if event == "error":
        request_id = data.get("request_id")
        raise ServiceError(
            int(data.get("status", 500)), str(data.get("error")), data.get("details"), None, request_id or None
        )
    return None


class _Base:
    def __init__(self, retry: RetryPolicy | None, clock: Callable[[], float]) -> None:
        self.retry = retry or RetryPolicy()
        self._clock = clock

    def _give_up(self, state: RetryState, error: ServiceError, retryable: bool | None = None) -> float:
        """The wait before the next attempt; raises when the policy says stop."""
        if not (error.status_code in self.retry.statuses if retryable is None else retryable):
            raise error
        delay = state.next_delay(self._clock(), error.retry_after)
        if delay is None:
            raise RetryBudgetExceeded(
                error.status_code,
                f"{error.message} (gave up after {state.attempts} attempt(s) within {self.retry.budget_s:g} s)",
                error.details,
                error.retry_after,
                error.request_id,
            ) from error
        return delay


UNREACHABLE = 0  # the pseudo-status of a connection that never got an answer


class FaceDetailerClient(_Base):
    """Blocking client. Use as a context manager, or call :meth:`close`.

    ``api_key``: the service's API key (default: ``$FACEDETAILER_API_KEY``; none: no header).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(retry, clock)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, headers=auth_headers(api_key, headers), transport=transport
        )

    def __enter__(self) -> FaceDetailerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, url: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """One call with retries; a 2xx response (open when ``stream``) or a :class:`ServiceError`."""
        state = RetryState(self.retry, self._clock())
        while True:
            state.attempts += 1
            try:
                request = self._http.build_request(method, url, **kwargs)
                response = self._http.send(request, stream=stream)
            except httpx.ConnectError as error:
                if not self.retry.retry_unreachable:
                    raise
                failure = ServiceError(UNREACHABLE, f"cannot connect to {self._http.base_url}: {error}")
                self._sleep(self._give_up(state, failure, retryable=True))
                continue
            if response.is_success:
                return response
            body = response.read()
            response.close()
            self._sleep(self._give_up(state, service_error(response, body)))

    def info(self) -> dict[str, Any]:
        """Models, samplers, schedulers, limits, defaults and the parameters' widget definitions."""
        return self._send("GET", "/v1/info").json()

    def health(self) -> dict[str, Any]:
        """``/healthz`` (a 503 while a deployment is unhealthy is an answer too, not an error)."""
        response = self._http.get("/healthz")
        return response.json()

    def detail(
        self,
        image: ImageInput | Sequence[ImageInput],
        params: dict[str, Any] | None = None,
        *,
        workflow: dict[str, Any] | str | None = None,
        workflow_node: str | int | None = None,
    ) -> DetailResult:
        """Detail one image (or a list: image k uses seed + k) and return every output."""
        files, data = _multipart(_as_list(image), params, workflow, workflow_node)
        response = self._send("POST", "/v1/detail", params={"format": "json"}, files=files, data=data)
        return DetailResult.from_json(response.json())

    def detail_png(
        self,
        image: ImageInput,
        params: dict[str, Any] | None = None,
        *,
        workflow: dict[str, Any] | str | None = None,
        workflow_node: str | int | None = None,
    ) -> bytes:
        """Only the detailed image, as PNG bytes (smaller answer than :meth:`detail`)."""
        files, data = _multipart([image], params, workflow, workflow_node)
        return self._send("POST", "/v1/detail", files=files, data=data).content

    def stream(
        self,
        image: ImageInput | Sequence[ImageInput],
        params: dict[str, Any] | None = None,
        *,
        workflow: dict[str, Any] | str | None = None,
        workflow_node: str | int | None = None,
        progress: bool = True,
        preview_every: int = 0,
    ) -> Iterator[StreamItem]:
        """The request's events as it runs, then the :class:`DetailResult`.

        A :class:`PlanEvent` when the faces to sample are known, a :class:`StepProgress` per
        sampler step of a face (with a latent preview JPEG every ``preview_every`` steps; 0: none),
        a :class:`FaceEvent` per finished face. ``progress=False``: face events only.
        """
        files, data = _multipart(_as_list(image), params, workflow, workflow_node)
        _stream_fields(data, progress, preview_every)
        response = self._send("POST", "/v1/detail/stream", stream=True, files=files, data=data)
        decoder = SSEDecoder()
        try:
            for line in response.iter_lines():
                event = decoder.feed(line)
                if event is not None and (item := _stream_item(*event)) is not None:
                    yield item
        finally:
            response.close()

    def import_workflow(self, workflow: dict[str, Any] | str, workflow_node: str | int | None = None) -> dict[str, Any]:
        """The parameters the service reads from a ComfyUI workflow (without running it)."""
        body = {"workflow": workflow, "workflow_node": workflow_node}
        return self._send("POST", "/v1/workflow/import", json=body).json()


class AsyncFaceDetailerClient(_Base):
    """The same API for asyncio: ``async with AsyncFaceDetailerClient(url) as client: await client.detail(…)``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(retry, clock)
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=timeout, headers=auth_headers(api_key, headers), transport=transport
        )

    async def __aenter__(self) -> AsyncFaceDetailerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, url: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        state = RetryState(self.retry, self._clock())
        while True:
            state.attempts += 1
            try:
                request = self._http.build_request(method, url, **kwargs)
                response = await self._http.send(request, stream=stream)
            except httpx.ConnectError as error:
                if not self.retry.retry_unreachable:
                    raise
                failure = ServiceError(UNREACHABLE, f"cannot connect to {self._http.base_url}: {error}")
                await self._sleep(self._give_up(state, failure, retryable=True))
                continue
            if response.is_success:
                return response
            body = await response.aread()
            await response.aclose()
            await self._sleep(self._give_up(state, service_error(response, body)))

    async def info(self) -> dict[str, Any]:
        return (await self._send("GET", "/v1/info")).json()

    async def health(self) -> dict[str, Any]:
        return (await self._http.get("/healthz")).json()

    async def detail(
        self,
        image: ImageInput | Sequence[ImageInput],
        params: dict[str, Any] | None = None,
        *,
        workflow: dict[str, Any] | str | None = None,
        workflow_node: str | int | None = None,
    ) -> DetailResult:
        files, data = _multipart(_as_list(image), params, workflow, workflow_node)
        response = await self._send("POST", "/v1/detail", params={"format": "json"}, files=files, data=data)
        return DetailResult.from_json(response.json())

    async def detail_png(
        self,
        image: ImageInput,
        params: dict[str, Any] | None = None,
        *,
        workflow: dict[str, Any] | str | None = None,
        workflow_node: str | int | None = None,
    ) -> bytes:
        files, data = _multipart([image], params, workflow, workflow_node)
        return (await self._send("POST", "/v1/detail", files=files, data=data)).content

    async def stream(
        self,
        image: ImageInput | Sequence[ImageInput],
        params: dict[str, Any] | None = None,
        *,
        workflow: dict[str, Any] | str | None = None,
        workflow_node: str | int | None = None,
        progress: bool = True,
        preview_every: int = 0,
    ) -> AsyncIterator[StreamItem]:
        """:meth:`FaceDetailerClient.stream`, asynchronously."""
        files, data = _multipart(_as_list(image), params, workflow, workflow_node)
        _stream_fields(data, progress, preview_every)
        response = await self._send("POST", "/v1/detail/stream", stream=True, files=files, data=data)
        decoder = SSEDecoder()
        try:
            async for line in response.aiter_lines():
                event = decoder.feed(line)
                if event is not None and (item := _stream_item(*event)) is not None:
                    yield item
        finally:
            await response.aclose()

    async def import_workflow(
        self, workflow: dict[str, Any] | str, workflow_node: str | int | None = None
    ) -> dict[str, Any]:
        body = {"workflow": workflow, "workflow_node": workflow_node}
        return (await self._send("POST", "/v1/workflow/import", json=body)).json()
