"""serve_app/model_calls.py without Ray: which failures are retried, how often, within which deadline.

The calls are stand-ins for Serve's ``DeploymentResponse`` (awaitable, ``cancel()``); the real
replica deaths are in test_replica_loss.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve_app.model_calls import ModelCalls, ReplicaLostError


class FakeResponse:
    """Raises ``error`` (or returns ``value``) after ``delay`` seconds; records ``cancel()``."""

    def __init__(self, value: Any = None, error: BaseException | None = None, delay: float = 0.0) -> None:
        self.value, self.error, self.delay = value, error, delay
        self.cancelled = False

    def __await__(self):
        return self._result().__await__()

    async def _result(self) -> Any:
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.value

    def cancel(self) -> None:
        self.cancelled = True


class FakeMethod:
    """A deployment handle's method: ``remote()`` hands out ``responses`` in order; ``sent`` lists them."""

    def __init__(self, *responses: FakeResponse) -> None:
        self.pending, self.sent = list(responses), []

    def remote(self, *args: Any, **kwargs: Any) -> FakeResponse:
        self.sent.append(self.pending.pop(0))
        return self.sent[-1]


def fast(**options: Any) -> ModelCalls:
    return ModelCalls(backoff_s=0.01, max_backoff_s=0.02, **options)


def test_a_call_whose_replica_died_is_sent_again_and_answered():
    retried: list[str] = []
    calls = fast(on_retry=retried.append)
    method = FakeMethod(FakeResponse(error=ActorDiedError()), FakeResponse(error=ActorUnavailableError("gone", None)),
                        FakeResponse(value="faces"))
    assert asyncio.run(calls.call("detector", method, "image", 0.5)) == "faces"
    sent = method.sent
    assert len(sent) == 3 and [loss.error for loss in calls.losses] == ["ActorDiedError", "ActorUnavailableError"]
    assert retried == ["detector", "detector"]
    assert sent[0].cancelled and sent[1].cancelled and not sent[2].cancelled  # lost attempts are let go


def test_retries_are_counted_per_call_then_the_request_ends_with_replica_lost():
    calls = fast(max_retries=2)
    method = FakeMethod(*(FakeResponse(error=ActorDiedError()) for _ in range(5)))
    with pytest.raises(ReplicaLostError) as raised:
        asyncio.run(calls.call("inpainter", method))
    assert len(method.sent) == 3 and calls.lost() == ["inpainter"]
    assert raised.value.attempts == 3 and raised.value.deployment == "inpainter"
    assert "inpainter replica" in str(raised.value)


def test_no_retry_would_start_past_the_deadline():
    calls = ModelCalls.within(0.3, max_retries=10, backoff_s=0.2, max_backoff_s=0.2)
    method = FakeMethod(*(FakeResponse(error=ActorDiedError(), delay=0.05) for _ in range(10)))
    started = time.monotonic()
    with pytest.raises(ReplicaLostError):
        asyncio.run(calls.call("SAM", method))
    assert time.monotonic() - started < 0.5
    assert 1 <= len(method.sent) <= 2


@pytest.mark.parametrize("error", [BackPressureError(num_queued_requests=9, max_queued_requests=8),
                                   DeploymentUnavailableError(None), ValueError("bad sampler")])
def test_overload_a_failed_deployment_and_the_model_s_own_errors_are_not_retried(error):
    calls = fast()
    method = FakeMethod(FakeResponse(error=error), FakeResponse(value="never"))
    with pytest.raises(type(error)):
        asyncio.run(calls.call("inpainter", method))
    assert len(method.sent) == 1 and not calls.losses


def test_a_cancelled_caller_cancels_the_call_in_flight_and_is_not_retried():
    calls = fast()
    method = FakeMethod(FakeResponse(value="late", delay=5), FakeResponse(value="never"))

    async def leave_early() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(calls.call("inpainter", method), timeout=0.05)
        assert await calls.unserved() == []  # no Serve controller to ask: the caller answers 504

    asyncio.run(leave_early())
    assert len(method.sent) == 1 and method.sent[0].cancelled
    assert [what for what, _ in calls.cut_short] == ["inpainter"] and not calls.lost()


def test_an_unreachable_replica_is_waited_out_within_the_deadline_without_counting_as_a_death():
    """A node going: its replicas are unreachable for a while before Ray declares them dead."""
    calls = fast(max_retries=1)
    unreachable = (FakeResponse(error=ActorUnavailableError("node going", None)) for _ in range(5))
    method = FakeMethod(*unreachable, FakeResponse(error=ActorDiedError()), FakeResponse(value="crops"))
    assert asyncio.run(calls.call("inpainter", method)) == "crops"
    assert len(method.sent) == 7


class FakeStream:
    """A streaming response: yields ``items``, then raises ``error`` if given; records ``cancel()``."""

    def __init__(self, items: list[Any], error: BaseException | None = None) -> None:
        self.items, self.error, self.cancelled = items, error, False

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for item in self.items:
            await asyncio.sleep(0)
            yield item
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


def test_a_stream_whose_replica_died_is_read_again_from_the_start_on_a_live_replica():
    retried: list[str] = []
    calls = fast(on_retry=retried.append)
    method = FakeMethod(FakeStream(["step 1", "step 2"], error=ActorDiedError()),  # type: ignore[arg-type]
                        FakeStream(["step 1", "step 2", "step 3", "result"]))  # type: ignore[arg-type]  # fmt: skip
    seen: list[str] = []
    asyncio.run(calls.stream("inpainter", method, seen.append, ["job"], "settings"))
    assert seen == ["step 1", "step 2", "step 1", "step 2", "step 3", "result"]
    assert retried == ["inpainter"] and calls.lost() == ["inpainter"]
    assert method.sent[0].cancelled and not method.sent[1].cancelled


def test_a_stream_that_loses_every_replica_ends_with_replica_lost():
    calls = fast(max_retries=1)
    method = FakeMethod(*(FakeStream([], error=ActorDiedError()) for _ in range(3)))  # type: ignore[arg-type]
    with pytest.raises(ReplicaLostError):
        asyncio.run(calls.stream("inpainter", method, lambda item: None))
    assert len(method.sent) == 2
