"""When to retry: 429/503 answers (and a server not reachable yet), honouring ``Retry-After``.

A request is retried only while the whole call stays within ``budget_s``: a ``Retry-After``
that would end past the budget ends the call at once instead of sleeping for nothing.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one call. ``RetryPolicy(max_attempts=1)`` turns retrying off."""

    budget_s: float = 120.0  # no attempt starts later than this after the first one started
    max_attempts: int = 8
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))
    backoff_s: float = 0.5  # the first wait when the service gives no Retry-After, doubled each time
    max_backoff_s: float = 30.0
    retry_unreachable: bool = True  # connection refused/reset before any answer (e.g. service starting)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent/invalid."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass
class RetryState:
    """Counts attempts of one call against its policy and clock."""

    policy: RetryPolicy
    started: float
    attempts: int = 0

    def next_delay(self, now: float, retry_after: float | None) -> float | None:
        """How long to wait before the next attempt, or None to give up (no attempts or budget left)."""
        if self.attempts >= self.policy.max_attempts:
            return None
        if retry_after is not None:
            delay = retry_after
        else:
            delay = min(self.policy.backoff_s * 2 ** (self.attempts - 1), self.policy.max_backoff_s)
        if now + delay - self.started > self.policy.budget_s:
            return None
        return delay
