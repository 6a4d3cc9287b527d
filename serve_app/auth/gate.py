"""The ingress' gate: who is calling (``Authorization: Bearer``), may they, and is there quota left.

:class:`AuthGate` is built by each ingress replica from ``args.auth``. It answers in
:class:`AuthError` s (401 without a valid key, 403 for a key without the route's scope, 429 over
a quota with ``Retry-After``, 422 for a request larger than a quota). The quota numbers live in
one :class:`~serve_app.auth.quotas.QuotaLedger` for all replicas — the ingress deployment's
deployment-scoped actor :data:`LEDGER_ACTOR_NAME`; if it cannot be reached (Serve's local testing
mode, or while the controller recreates it) the replica counts on its own ledger and logs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from serve_app.auth.keys import KeyStore
from serve_app.auth.quotas import QuotaLedger, Refusal
from serve_app.config import AuthArgs, KeyQuotas
from serve_app.http_adapters.errors import RequestError

logger = logging.getLogger("ray.serve")

LEDGER_ACTOR_NAME = "quota_ledger"
LEDGER_CALL_TIMEOUT_S = 5.0
LEDGER_RETRY_S = 10.0  # after a failed call, the replica's own ledger is used this long before trying again
LEASE_MARGIN_S = 60.0  # a lease outlives the request timeout by this much before it expires on its own
REALM = 'Bearer realm="facedetailer"'


class AuthError(RequestError):
    """401/403/429/422 from the gate, with the headers it needs (``WWW-Authenticate``, ``Retry-After``)."""

    @classmethod
    def of_refusal(cls, refusal: Refusal) -> AuthError:
        if refusal.retry_after_s is None:
            return cls(422, refusal.message(), refusal.details())
        return cls(429, refusal.message(), refusal.details(), {"Retry-After": refusal.retry_after_header})


@dataclass(frozen=True)
class Caller:
    """An authenticated request's key: its id (the fair queue's tenant), scopes, quotas and weight."""

    key_id: str
    scopes: frozenset[str]
    quotas: KeyQuotas
    weight: float = 1.0

    def public(self) -> dict[str, Any]:
        """What the key's holder may see about it (``GET /v1/info``)."""
        return {"id": self.key_id, "scopes": sorted(self.scopes), "quotas": self.quotas.model_dump(),
                "weight": self.weight}  # fmt: skip


def ledger_actor_config() -> Any:
    """The shared quota ledger as a deployment-scoped actor of the ingress deployment (no CPU reserved)."""
    import ray
    from ray.serve.config import DeploymentActorConfig

    return DeploymentActorConfig(
        name=LEDGER_ACTOR_NAME, actor_class=ray.remote(QuotaLedger), actor_options={"num_cpus": 0}
    )


def _deployment_ledger() -> Any:
    from ray import serve

    return serve.get_deployment_actor(LEDGER_ACTOR_NAME)


class _Ledger:
    """Calls the shared ledger actor; the replica's own :class:`QuotaLedger` when it cannot."""

    def __init__(self, find_actor: Callable[[], Any] | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._find_actor = find_actor
        self._clock = clock
        self._actor: Any = None
        self._local = QuotaLedger()
        self._local_until = 0.0 if find_actor is not None else float("inf")

    @property
    def shared(self) -> bool:
        return self._clock() >= self._local_until

    async def call(self, method: str, *args: Any) -> tuple[Any, bool]:
        """``(result, shared)``: the method's result and whether the shared ledger answered."""
        if self.shared:
            try:
                if self._actor is None:
                    self._actor = self._find_actor()  # type: ignore[misc]
                ref = getattr(self._actor, method).remote(*args)
                return await asyncio.wait_for(asyncio.wrap_future(ref.future()), LEDGER_CALL_TIMEOUT_S), True
            except Exception as error:  # no actor (yet), or it died: count here for a while
                logger.warning("quota ledger unreachable (%s: %s); this replica counts alone for %.0f s",
                               type(error).__name__, error, LEDGER_RETRY_S)  # fmt: skip
                self._actor = None
                self._local_until = self._clock() + LEDGER_RETRY_S
        return getattr(self._local, method)(*args), False

    def release(self, lease_id: str, refund: bool, shared: bool) -> None:
        """Fire and forget (runs in ``finally`` blocks, also of cancelled requests: never awaits)."""
        if not shared:
            self._local.release(lease_id, refund)
            return
        try:
            actor = self._actor or self._find_actor()  # type: ignore[misc]
            actor.release.remote(lease_id, refund)  # after the reserve: one caller's actor calls keep their order
        except Exception as error:  # the lease expires on its own (ttl)
            logger.warning("quota ledger: cannot release lease %s (%s); it expires on its own", lease_id, error)


class QuotaLease:
    """One request's hold on its key's crops and work units, from planning until it ends."""

    def __init__(self, ledger: _Ledger, caller: Caller, ttl_s: float) -> None:
        self._ledger, self.caller, self._ttl_s = ledger, caller, ttl_s
        self.lease_id = uuid.uuid4().hex
        self._shared: bool | None = None  # set once a reservation was sent
        self.refund = False  # set when the request ends in a 503 (the caller is told to retry)

    async def reserve(self, crops: int, work_units: float) -> None:
        """Take the request's planned crops and units, or raise 429 (or 422 if it can never fit)."""
        quotas = self.caller.quotas
        if quotas.concurrent_crops is None and quotas.work_units_per_hour is None:
            return
        args = (self.lease_id, self.caller.key_id, crops, work_units, quotas.model_dump(), self._ttl_s)
        self._shared = self._ledger.shared  # a cancellation during the call still releases on this ledger
        refusal, self._shared = await self._ledger.call("reserve", *args)
        if refusal is not None:
            raise AuthError.of_refusal(refusal)

    def release(self) -> None:
        """Give back what :meth:`reserve` took (safe to call on every exit path, once or more)."""
        if self._shared is not None:
            self._ledger.release(self.lease_id, self.refund, self._shared)
            self._shared = None


class AuthGate:
    """Keys, scopes and quotas of one ingress replica (see the module doc)."""

    def __init__(
        self, args: AuthArgs, request_timeout_s: float, find_ledger: Callable[[], Any] | None = _deployment_ledger
    ) -> None:
        self.args = args
        self.keys = KeyStore(args.keys, args.keys_file, args.reload_interval_s)
        self.ledger = _Ledger(find_ledger)
        self.lease_ttl_s = request_timeout_s + LEASE_MARGIN_S
        logger.info("API keys required: %d keys (%s)", len(self.keys.ids), ", ".join(self.keys.ids))

    @classmethod
    def of(cls, args: Mapping[str, Any] | AuthArgs | None, request_timeout_s: float) -> AuthGate | None:
        if args is None:
            return None
        return cls(args if isinstance(args, AuthArgs) else AuthArgs.model_validate(args), request_timeout_s)

    def identify(self, authorization: str | None) -> Caller | None:
        """The caller of a valid key, else None (for public routes that say more to a known caller)."""
        token = _bearer_token(authorization)
        entry = self.keys.find(token) if token else None
        if entry is None:
            return None
        return Caller(entry.id, frozenset(entry.scopes), entry.quotas, entry.weight)

    def authenticate(self, authorization: str | None, scope: str) -> Caller:
        """The caller, who holds ``scope``; else 401 (no valid key) or 403 (a key without the scope)."""
        token = _bearer_token(authorization)
        if token is None:
            raise AuthError(
                401,
                "an API key is required: send it as 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": REALM},
            )
        caller = self.identify(authorization)
        if caller is None:
            raise AuthError(
                401,
                "invalid API key (unknown, or removed)",
                headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'},
            )
        if scope not in caller.scopes:
            raise AuthError(
                403,
                f"API key {caller.key_id!r} lacks the {scope!r} scope this route needs "
                f"(it has: {', '.join(sorted(caller.scopes))})",
                headers={"WWW-Authenticate": f'{REALM}, error="insufficient_scope", scope="{scope}"'},
            )
        return caller

    async def admit(self, caller: Caller) -> None:
        """Count one detail request of ``caller`` in, or raise 429 (requests per minute, or nothing left)."""
        quotas = caller.quotas
        if quotas == KeyQuotas():
            return
        refusal, _ = await self.ledger.call("admit_request", caller.key_id, quotas.model_dump())
        if refusal is not None:
            raise AuthError.of_refusal(refusal)

    def lease(self, caller: Caller | None) -> QuotaLease | None:
        return QuotaLease(self.ledger, caller, self.lease_ttl_s) if caller is not None else None

    def tenant(self, caller: Caller | None) -> tuple[str, float]:
        """The inpainter's fair-queue tenant and weight for ``caller`` (never the secret)."""
        if caller is None or not self.args.fair_queueing:
            return "", 1.0
        return caller.key_id, caller.weight

    async def usage(self) -> dict[str, Any]:
        """Per-key usage for ``GET /v1/stats`` (admins)."""
        usage, shared = await self.ledger.call("usage")
        return {"ledger": "shared" if shared else "replica", "keys": usage, "configured_keys": sorted(self.keys.ids)}


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
