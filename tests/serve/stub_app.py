"""The ingress's HTTP app in this process, without Ray: real request reading, validation, limits,
pipeline and error handling in front of stub model deployments.

Every line between the HTTP request and a model call is the served app's own code (the
``FaceDetailerIngress`` class with its FastAPI routes, middleware and exception handlers); only
the deployment handles are stubs. They answer as the real deployments do where the ingress can
tell — the inpainter's sampler and scheduler names, its tokenizer (the ``sim://`` CLIP-shaped one),
its checks of a crop's settings and cycles — and cost nothing, so a fuzzer can send hundreds of
requests in seconds. The stub detector finds one face in the middle of any image of 32 px or more.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from deployments.inpainter import RefineResult, check_job
from deployments.inpainter_hooks import check_cycle_plan
from deployments.sam import SamPrediction
from deployments.sampling import SAMPLER_NAMES, SCHEDULER_NAMES, validate
from deployments.simulated import SimulatedTokenizer
from deployments.step_progress import StepEvent
from facedetailer.segs import Detection
from tests.serve.frozen_app import kept_as_frozen

MIN_FACE_IMAGE = 32
# Serve's ingress wrapper has an ``async def __del__`` (Serve awaits it); kept here, the instances
# are never collected mid-test, where Python would call it without awaiting it.
_INSTANCES: list[Any] = []


class _Method:
    """``handle.method.remote(...)``: a task on the running loop (awaitable and cancellable like a response)."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Future:
        async def call() -> Any:
            result = self.function(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return asyncio.ensure_future(call())


class _StreamingMethod:
    """``handle.options(stream=True).method``: ``remote`` gives the async generator (Serve's has ``cancel``)."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def remote(self, *args: Any, **kwargs: Any) -> _Stream:
        return _Stream(self.function(*args, **kwargs))


class _Stream:
    def __init__(self, generator: Any) -> None:
        self.generator = generator

    def __aiter__(self) -> Any:
        return self.generator

    def cancel(self) -> None:
        return None


class StubHandle:
    """A deployment handle over a plain object; ``options(...)`` other than ``stream`` (e.g. a
    multiplexed model id) is ignored."""

    def __init__(self, target: Any, stream: bool = False) -> None:
        self._target = target
        self._stream = stream

    def options(self, stream: bool | None = None, **_: Any) -> StubHandle:
        return StubHandle(self._target, self._stream if stream is None else stream)

    def __getattr__(self, name: str) -> _Method | _StreamingMethod:
        function = getattr(self._target, name)
        return _StreamingMethod(function) if self._stream else _Method(function)


class StubDetector:
    def __init__(self) -> None:
        self.calls = 0

    def detect(self, image: np.ndarray, threshold: float) -> list[Detection]:
        self.calls += 1
        height, width = image.shape[:2]
        if min(height, width) < MIN_FACE_IMAGE:
            return []
        box = (width * 0.375, height * 0.375, width * 0.625, height * 0.625)
        return [Detection("face", box, 0.9)]

    def info(self) -> dict[str, Any]:
        return {"model": "stub://detector", "model_path": "/srv/models/stub/detector.onnx"}

    def check_health(self) -> None:
        return None


class StubSam:
    def predict(self, image: np.ndarray, prompts: list) -> list[SamPrediction]:
        height, width = image.shape[:2]
        masks = np.zeros((1, height, width), dtype=bool)
        masks[0, height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = True
        return [SamPrediction(masks, np.array([0.99], dtype=np.float32)) for _ in prompts]

    def info(self) -> dict[str, Any]:
        return {"checkpoint": "stub://sam", "checkpoint_path": "/srv/models/stub/sam.pth"}

    def check_health(self) -> None:
        return None


class StubInpainter:
    """Checks each crop as :meth:`deployments.inpainter.Inpainter.payloads` does, then inverts it."""

    def __init__(self) -> None:
        self.refined = 0

    def supported_samplers(self) -> list[str]:
        return list(SAMPLER_NAMES)

    def supported_schedulers(self) -> list[str]:
        return list(SCHEDULER_NAMES)

    def prompt_tokenizers(self, model: str | None = None) -> list[tuple[Any, int]]:
        return [(SimulatedTokenizer(), SimulatedTokenizer.model_max_length)]

    def refine(self, jobs: list, settings: Any, model: str | None = None) -> RefineResult:
        for index, job in enumerate(jobs):
            check_job(index, job)
            resolved = job.settings or settings
            validate(resolved.sampler_name, resolved.scheduler, resolved.steps, resolved.denoise)
            check_cycle_plan(resolved)
        self.refined += len(jobs)
        return RefineResult(images=[255 - job.image for job in jobs])

    async def refine_stream(
        self, jobs: list, settings: Any, model: str | None = None, *, preview_every: int = 0, **_: Any
    ) -> AsyncIterator[list[StepEvent] | RefineResult]:
        """:meth:`refine` as the inpainter streams it: each step of every crop, then the result."""
        result = self.refine(jobs, settings, model)  # the crops are checked before the first step
        for step in range(1, settings.steps + 1):
            yield [StepEvent(index, 0, 1, step, settings.steps) for index in range(len(jobs))]
        yield result

    def info(self) -> dict[str, Any]:
        return {"model": "stub://inpainter", "source": "/srv/models/stub/inpainter", "controlnets": {}}

    def stats(self) -> dict[str, Any]:
        return {"active_crops": 0, "queued_crops": 0}

    def check_health(self) -> None:
        return None


async def _new_ingress(**kwargs: Any) -> Any:
    from serve_app.ingress import FaceDetailerIngress

    cls = FaceDetailerIngress.func_or_class  # Serve's ingress wrapper class: async __init__
    instance = cls.__new__(cls)
    await cls.__init__(instance, **kwargs)
    return instance


def bind_to_instance(app: Any, instance: Any) -> None:
    """Serve resolves a route's ``self`` from the replica context; here it is ``instance``."""
    from ray.serve._private.http_util import _walk_fastapi_routes

    for route, _, _ in _walk_fastapi_routes(app):
        signature = getattr(route.endpoint, "__signature__", None)
        if signature is not None and "self" in signature.parameters:
            app.dependency_overrides[signature.parameters["self"].default.dependency] = lambda: instance


@contextmanager
def ingress_app(limits: dict[str, Any] | None = None, **kwargs: Any) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(the ASGI app, the stubs) of a FaceDetailerIngress over stub deployments."""
    stubs = {"detector": StubDetector(), "sam": StubSam(), "inpainter": StubInpainter()}
    instance = asyncio.run(
        _new_ingress(
            detector=StubHandle(stubs["detector"]),
            inpainter=StubHandle(stubs["inpainter"]),
            sam=StubHandle(stubs["sam"]),
            limits=limits,
            **kwargs,
        )
    )
    _INSTANCES.append(instance)
    # one app object per process (Serve's frozen copy, pickled by later serve.run calls): given back
    # as it was, so nested uses restore the outer one and served apps get no in-process state
    with kept_as_frozen() as app:
        assert app is instance.app
        bind_to_instance(app, instance)
        yield app, stubs
