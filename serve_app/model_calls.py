"""Calls to the model deployments that outlive a replica: cancelled with their caller, retried when a replica dies.

Every model call is deterministic (a crop carries its seed; detection and SAM are pure functions
of their inputs), so a call whose replica died — its actor killed, its process crashed, its node
removed — is sent again and a live replica answers it with the same result. Serve's router sends
the new call to a running replica, or holds it until the controller has started one. The retries
stay within the request's deadline (``limits.request_timeout_s``), and the replicas that died
under one call are counted (``limits.replica_loss_retries``), so a request that crashes every
replica it reaches cannot take the whole deployment down (a replica merely unreachable — its node
going, not yet declared dead — is waited out). When no replica answers in time the request ends
with :class:`ReplicaLostError` (HTTP 503 with Retry-After). Overload (``BackPressureError``, a full
inpainter queue) is not retried here: the caller is told to come back later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.exceptions import ActorUnavailableError, NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError

logger = logging.getLogger("ray.serve")

# A replica gone: killed, crashed, unreachable (ActorUnavailableError is a RayActorError), or on a
# node that left the cluster (the call's arguments or result lost with it).
REPLICA_LOST: tuple[type[BaseException], ...] = (
    RayActorError,
    ReplicaUnavailableError,
    NodeDiedError,
    ObjectLostError,
    WorkerCrashedError,
)


class ReplicaLostError(RuntimeError):
    """A model call's replica died and no live replica answered it within the deadline or the retries."""

    def __init__(self, deployment: str, attempts: int, cause: BaseException) -> None:
        self.deployment, self.attempts = deployment, attempts
        super().__init__(
            f"the {deployment} replica serving this request was lost and no live replica answered "
            f"after {attempts} attempts ({type(cause).__name__})"
        )


async def cancellable(response: Any) -> Any:
    """Await a handle call; if the caller is cancelled (client gone, timeout), cancel the call too.

    Ray Serve does not cancel a deployment call when the coroutine awaiting it is cancelled, so
    without this a model replica would keep working for a request nobody waits for: queued
    detector/SAM calls are dropped and the inpainter's crops leave its engine at the next step.
    """
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise
    except RequestCancelledError:
        # Serve's local testing mode reports the caller's own cancellation as the call's
        # RequestCancelledError: still the caller's cancellation (a timeout must stay a 504).
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            response.cancel()
            raise asyncio.CancelledError from None
        raise


async def cancellable_stream(stream: Any, on_item: Callable[[Any], None]) -> None:
    """Read a streaming handle call to its end; if the caller is cancelled, cancel the call too."""
    try:
        async for item in stream:
            on_item(item)
    except asyncio.CancelledError:
        stream.cancel()
        raise
    except RequestCancelledError:  # local testing mode, as in cancellable
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            stream.cancel()
            raise asyncio.CancelledError from None
        raise


@dataclass(frozen=True)
class ReplicaLoss:
    """One lost attempt of a model call (kept for the request's outcome and the logs)."""

    deployment: str
    error: str
    at: float  # time.monotonic()


@dataclass
class ModelCalls:
    """One request's model calls: each retried on a live replica when its replica dies.

    ``deadline`` is the request's end (``time.monotonic()``; None: no deadline of its own — the
    caller's timeout still cancels). ``losses`` lists every lost attempt and ``cut_short`` the
    calls still waiting when the request was cancelled: a request that times out after a loss
    (:meth:`lost`), or while waiting for a deployment with no running replica (:meth:`unserved`),
    is answered 503 — no replica could serve it in time — not 504.
    """

    deadline: float | None = None
    max_retries: int = 3
    backoff_s: float = 0.5  # before the first retry; doubled after each, up to max_backoff_s
    max_backoff_s: float = 2.0
    on_retry: Callable[[str], None] | None = None  # e.g. a metric, called with the deployment's name
    losses: list[ReplicaLoss] = field(default_factory=list)
    cut_short: list[tuple[str, Any]] = field(default_factory=list)  # (what, method handle)

    @classmethod
    def within(cls, timeout_s: float, max_retries: int, **options: Any) -> ModelCalls:
        return cls(deadline=time.monotonic() + timeout_s, max_retries=max_retries, **options)

    async def call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        """``method.remote(*args, **kwargs)`` (a deployment handle's method), sent again if its replica dies."""
        attempt = deaths = 0
        while True:
            attempt += 1
            response = method.remote(*args, **kwargs)
            try:
                return await cancellable(response)
            except asyncio.CancelledError:
                self.cut_short.append((what, method))
                raise
            except REPLICA_LOST as error:
                deaths = await self._after_loss(what, response, error, attempt, deaths)

    async def stream(self, what: str, method: Any, on_item: Callable[[Any], None], *args: Any, **kwargs: Any) -> None:
        """A streaming call (``method`` of a ``stream=True`` handle) read to its end, each item given to
        ``on_item``; sent again from the start if its replica dies (a deterministic call sends the same
        items again: a progress bar steps back, the result is the same)."""
        attempt = deaths = 0
        while True:
            attempt += 1
            response = method.remote(*args, **kwargs)
            try:
                await cancellable_stream(response, on_item)
                return
            except asyncio.CancelledError:
                self.cut_short.append((what, method))
                raise
            except REPLICA_LOST as error:
                deaths = await self._after_loss(what, response, error, attempt, deaths)

    async def _after_loss(self, what: str, response: Any, error: BaseException, attempt: int, deaths: int) -> int:
        """Record a lost attempt and wait before the next (the replica deaths so far), or give up."""
        _abandon(response)
        self.losses.append(ReplicaLoss(what, type(error).__name__, time.monotonic()))
        # a replica that died under the call counts; one not reachable (yet to be declared dead,
        # its node going) costs nothing and is waited out within the deadline
        deaths += not isinstance(error, ActorUnavailableError)
        delay = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
        past_deadline = self.deadline is not None and time.monotonic() + delay >= self.deadline
        if deaths > self.max_retries or past_deadline:
            logger.warning("%s call lost its replica (%d attempts); giving up: %s", what, attempt, error)
            raise ReplicaLostError(what, attempt, error) from error
        logger.warning(
            "%s replica lost during a call (%s); retrying on a live replica in %.1f s (attempt %d, %d of "
            "%d deaths)", what, type(error).__name__, delay, attempt + 1, deaths, self.max_retries,
        )  # fmt: skip
        if self.on_retry is not None:
            self.on_retry(what)
        await asyncio.sleep(delay)
        return deaths

    def lost(self) -> list[str]:
        """The deployments a call of this request lost its replica in."""
        return sorted({loss.deployment for loss in self.losses})

    async def unserved(self) -> list[str]:
        """The deployments of the calls cut short that have no running replica now: the calls were
        waiting for one (e.g. every GPU node gone). Asked of Serve's controller; empty if it cannot say."""
        import ray
        from ray import serve

        if not self.cut_short or not ray.is_initialized():  # serve.status() would start a Ray instance
            return []
        try:
            status = await asyncio.to_thread(serve.status)
        except Exception as error:  # no controller to ask (e.g. Serve's local testing mode)
            logger.debug("cannot ask Serve for running replicas: %s", error)
            return []
        empty = set()
        for what, method in self.cut_short:
            try:
                replicas = status.applications[method.app_name].deployments[method.deployment_name].replica_states
            except (AttributeError, KeyError):
                continue
            if not replicas.get("RUNNING", 0):
                empty.add(what)
        return sorted(empty)


def _abandon(response: Any) -> None:
    """Best effort: a replica only unreachable for now (``ActorUnavailableError``) may still be running the call."""
    try:
        response.cancel()
    except Exception:  # the replica is gone: nothing to cancel
        pass
