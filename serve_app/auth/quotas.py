"""Per-key quotas: requests per minute, crops at once, work units per hour — one ledger for all replicas.

The ledger is a plain class. The served app runs one instance as a *deployment-scoped actor* of
the ingress deployment (``ledger_actor_config``; created and restarted with the deployment by the
Serve controller), so every ingress replica counts against the same numbers; an actor's methods
run one at a time, so each check-and-count is atomic. Its clock is the actor's own.

- ``requests_per_minute``: a sliding window of the last 60 s of admitted detail requests. A
  refused request is not counted; ``retry_after_s`` is when the oldest admission leaves the window.
- ``concurrent_crops``: a request *leases* its planned faces (after detection, before the
  inpainter) and gives them back when it ends, whatever the end (the ingress releases in a
  ``finally``). A lease also expires after ``ttl_s`` (the request timeout plus a margin), so a
  replica that dies holding leases cannot leak them. When crops are busy there is no exact time
  to wait: ``retry_after_s`` is :data:`BUSY_RETRY_S`.
- ``work_units_per_hour``: the request's planned work units (``serve_app.limits``) are charged
  when it is leased, in a sliding window of 3600 s; ``retry_after_s`` is when enough of the
  charges leave the window for the request to fit. A request the service refuses with 503 (the
  caller is asked to retry) gets its units back.

A request that could never fit (more crops or units than the quota itself) is refused with
``retry_after_s=None``: the ingress answers 422, since waiting would not help.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REQUEST_WINDOW_S = 60.0
WORK_WINDOW_S = 3600.0
BUSY_RETRY_S = 1.0  # crops are busy: a lease ends when a request does, which nothing predicts


@dataclass(frozen=True)
class Refusal:
    """Why a key cannot go ahead now: the quota, its limit, what is used and asked, when to retry."""

    key_id: str
    quota: str
    limit: float
    used: float
    requested: float
    retry_after_s: float | None  # None: the request alone exceeds the quota

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds, rounded up so that a retry then is not refused again."""
        assert self.retry_after_s is not None
        return str(max(1, math.ceil(self.retry_after_s - 1e-9)))

    def message(self) -> str:
        unit = {"requests_per_minute": "requests in the last minute", "concurrent_crops": "crops in flight",
                "work_units_per_hour": "work units in the last hour"}[self.quota]  # fmt: skip
        if self.retry_after_s is None:
            return (
                f"API key {self.key_id!r}: the request needs {_number(self.requested)} "
                f"{'crops at once' if self.quota == 'concurrent_crops' else 'work units'}, over the key's "
                f"{self.quota} quota of {_number(self.limit)}; ask for less (fewer faces, steps or a smaller size)"
            )
        return (
            f"API key {self.key_id!r}: {self.quota} quota of {_number(self.limit)} reached "
            f"({_number(self.used)} {unit}); retry in {self.retry_after_header} s"
        )

    def details(self) -> list[dict[str, Any]]:
        """The error's ``details``: one entry naming the quota (no single input is at fault)."""
        entry: dict[str, Any] = {
            "message": self.message(),
            "quota": self.quota,
            "limit": self.limit,
            "used": round(self.used, 3),
            "requested": round(self.requested, 3),
        }
        if self.retry_after_s is not None:
            entry["retry_after_s"] = int(self.retry_after_header)
        return [entry]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


@dataclass
class _Lease:
    key_id: str
    crops: int
    expires_at: float


@dataclass
class _KeyUsage:
    requests: deque[float] = field(default_factory=deque)  # admission times, oldest first
    charges: deque[tuple[float, float, str]] = field(default_factory=deque)  # (time, units, lease id)
    crops: int = 0


class QuotaLedger:
    """Every key's usage; methods take the key's quotas as a mapping (``KeyQuotas.model_dump()``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyUsage] = {}
        self._leases: dict[str, _Lease] = {}

    def admit_request(self, key_id: str, quotas: dict[str, Any]) -> Refusal | None:
        """Count a detail request in, or refuse it: over ``requests_per_minute``, or no crop or unit left."""
        now = self._tidy()
        usage = self._keys.setdefault(key_id, _KeyUsage())
        per_minute = quotas.get("requests_per_minute")
        if per_minute is not None and len(usage.requests) >= per_minute:
            oldest = usage.requests[len(usage.requests) - per_minute]
            retry = oldest + REQUEST_WINDOW_S - now
            return Refusal(key_id, "requests_per_minute", per_minute, len(usage.requests), 1, retry)
        refusal = self._room(key_id, usage, quotas, crops=1, units=0.0, now=now)
        if refusal is not None:
            return refusal
        usage.requests.append(now)
        return None

    def reserve(
        self, lease_id: str, key_id: str, crops: int, units: float, quotas: dict[str, Any], ttl_s: float
    ) -> Refusal | None:
        """Lease ``crops`` and charge ``units`` for one request, or refuse (nothing is taken then)."""
        now = self._tidy()
        usage = self._keys.setdefault(key_id, _KeyUsage())
        refusal = self._room(key_id, usage, quotas, crops=crops, units=units, now=now)
        if refusal is not None:
            return refusal
        self.release(lease_id)  # a lease id reserved twice replaces its first reservation
        usage.crops += crops
        if units > 0:
            usage.charges.append((now, float(units), lease_id))
        self._leases[lease_id] = _Lease(key_id, crops, now + ttl_s)
        return None

    def release(self, lease_id: str, refund: bool = False) -> None:
        """Give a lease's crops back (again: nothing happens); ``refund`` also returns its work units."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        usage = self._keys.get(lease.key_id)
        if usage is None:
            return
        usage.crops = max(0, usage.crops - lease.crops)
        if refund:
            usage.charges = deque(charge for charge in usage.charges if charge[2] != lease_id)

    def usage(self) -> dict[str, dict[str, Any]]:
        """Per key: requests in the last minute, crops in flight, work units in the last hour."""
        self._tidy()
        return {
            key_id: {
                "requests_last_minute": len(usage.requests),
                "crops_in_flight": usage.crops,
                "work_units_last_hour": round(sum(charge[1] for charge in usage.charges), 3),
            }
            for key_id, usage in sorted(self._keys.items())
        }

    def _room(
        self, key_id: str, usage: _KeyUsage, quotas: dict[str, Any], *, crops: int, units: float, now: float
    ) -> Refusal | None:
        limit = quotas.get("concurrent_crops")
        if limit is not None and crops > 0:
            if crops > limit:
                return Refusal(key_id, "concurrent_crops", limit, usage.crops, crops, None)
            if usage.crops + crops > limit:
                return Refusal(key_id, "concurrent_crops", limit, usage.crops, crops, BUSY_RETRY_S)
        limit = quotas.get("work_units_per_hour")
        if limit is not None:
            used = sum(charge[1] for charge in usage.charges)
            if units > limit:
                return Refusal(key_id, "work_units_per_hour", limit, used, units, None)
            # a request with no units yet (admission) needs some room left; a planned one needs all of it
            if (used + units > limit) if units > 0 else (used >= limit):
                retry = self._units_free_at(usage, limit, units, now)
                return Refusal(key_id, "work_units_per_hour", limit, used, units, retry)
        return None

    @staticmethod
    def _units_free_at(usage: _KeyUsage, limit: float, units: float, now: float) -> float:
        """Seconds until enough charges have left the hour's window for ``units`` more to fit."""
        remaining = sum(charge[1] for charge in usage.charges)
        for charged_at, amount, _ in usage.charges:  # oldest first
            remaining -= amount
            if (remaining + units <= limit) if units > 0 else (remaining < limit):
                return max(charged_at + WORK_WINDOW_S - now, 0.0)
        return 0.0

    def _tidy(self) -> float:
        """Drop what left the windows and the leases that expired; returns now."""
        now = self._clock()
        for lease_id, lease in list(self._leases.items()):
            if lease.expires_at <= now:
                self.release(lease_id)
        for key_id, usage in list(self._keys.items()):
            while usage.requests and usage.requests[0] <= now - REQUEST_WINDOW_S:
                usage.requests.popleft()
            while usage.charges and usage.charges[0][0] <= now - WORK_WINDOW_S:
                usage.charges.popleft()
            if not usage.requests and not usage.charges and not usage.crops:
                del self._keys[key_id]
        return now
