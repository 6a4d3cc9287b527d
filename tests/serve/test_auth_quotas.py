"""The quota ledger on a fake clock: windows, leases on every exit, Retry-After that is right, expiry.

"Right" means: a retry after ``Retry-After`` seconds is admitted, and one a second earlier is not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from serve_app.auth.gate import AuthError, QuotaLease, _Ledger
from serve_app.auth.quotas import BUSY_RETRY_S, QuotaLedger
from serve_app.config import KeyQuotas
from tests.serve.test_auth_keys import Clock, gate


def ledger() -> tuple[QuotaLedger, Clock]:
    clock = Clock()
    return QuotaLedger(clock), clock


def test_requests_per_minute_is_a_sliding_window_and_retry_after_is_exact():
    book, clock = ledger()
    quotas = {"requests_per_minute": 2}
    assert book.admit_request("k", quotas) is None
    clock.now += 10
    assert book.admit_request("k", quotas) is None
    clock.now += 5
    refusal = book.admit_request("k", quotas)
    assert refusal.quota == "requests_per_minute" and refusal.retry_after_s == pytest.approx(45)
    assert refusal.retry_after_header == "45" and refusal.details()[0]["retry_after_s"] == 45
    assert "quota of 2 reached" in refusal.message() and "retry in 45 s" in refusal.message()
    clock.now += 44
    assert book.admit_request("k", quotas) is not None, "a second early is still refused"
    clock.now += 1
    assert book.admit_request("k", quotas) is None, "Retry-After later, it is admitted"
    assert book.admit_request("other", quotas) is None, "keys do not share a quota"
    assert book.usage()["k"]["requests_last_minute"] == 2


def test_retry_after_rounds_up_to_whole_seconds():
    book, clock = ledger()
    book.admit_request("k", {"requests_per_minute": 1})
    clock.now += 0.4
    refusal = book.admit_request("k", {"requests_per_minute": 1})
    assert refusal.retry_after_s == pytest.approx(59.6) and refusal.retry_after_header == "60"


def test_concurrent_crops_are_leased_and_released():
    book, _ = ledger()
    quotas = {"concurrent_crops": 4}
    assert book.reserve("r1", "k", 3, 0.0, quotas, ttl_s=60) is None
    refusal = book.reserve("r2", "k", 2, 0.0, quotas, ttl_s=60)
    assert refusal.quota == "concurrent_crops" and refusal.retry_after_s == BUSY_RETRY_S
    assert book.admit_request("k", quotas) is None, "one crop is still free"
    assert book.reserve("r3", "k", 1, 0.0, quotas, ttl_s=60) is None
    assert book.admit_request("k", quotas).quota == "concurrent_crops", "none free: refused before any work"
    book.release("r1")
    book.release("r1")  # again: nothing happens
    assert book.usage()["k"]["crops_in_flight"] == 1
    assert book.reserve("r2", "k", 2, 0.0, quotas, ttl_s=60) is None
    too_big = book.reserve("r4", "k", 5, 0.0, quotas, ttl_s=60)
    assert too_big.retry_after_s is None and "over the key's concurrent_crops quota of 4" in too_big.message()


def test_a_lease_expires_when_its_replica_never_releases_it():
    book, clock = ledger()
    assert book.reserve("lost", "k", 4, 0.0, {"concurrent_crops": 4}, ttl_s=660) is None
    clock.now += 659
    assert book.usage()["k"]["crops_in_flight"] == 4
    clock.now += 1
    assert "k" not in book.usage() or book.usage()["k"]["crops_in_flight"] == 0


def test_work_units_per_hour_and_the_wait_until_a_request_fits():
    book, clock = ledger()
    quotas = {"work_units_per_hour": 100}
    assert book.reserve("a", "k", 1, 60.0, quotas, ttl_s=60) is None
    clock.now += 600
    assert book.reserve("b", "k", 1, 30.0, quotas, ttl_s=60) is None
    book.release("a")
    book.release("b")  # finishing does not give units back
    clock.now += 600
    refusal = book.reserve("c", "k", 1, 50.0, quotas, ttl_s=60)  # 90 used: fits once a's 60 leave
    assert refusal.quota == "work_units_per_hour" and refusal.retry_after_s == pytest.approx(2400)
    assert book.reserve("d", "k", 1, 10.0, quotas, ttl_s=60) is None, "a smaller one fits now"
    clock.now += 2399
    assert book.reserve("c", "k", 1, 50.0, quotas, ttl_s=60) is not None
    clock.now += 1
    assert book.reserve("c", "k", 1, 50.0, quotas, ttl_s=60) is None
    assert book.reserve("e", "k", 1, 101.0, quotas, ttl_s=60).retry_after_s is None


def test_a_refunded_lease_gives_its_units_back():
    book, _ = ledger()
    quotas = {"work_units_per_hour": 100}
    assert book.reserve("busy", "k", 1, 80.0, quotas, ttl_s=60) is None
    book.release("busy", refund=True)  # e.g. the inpainter's queue was full: 503, retry
    assert book.usage() == {}
    assert book.reserve("again", "k", 1, 80.0, quotas, ttl_s=60) is None


def test_admission_refuses_a_key_whose_hourly_units_are_spent():
    book, clock = ledger()
    quotas = {"work_units_per_hour": 10}
    assert book.reserve("a", "k", 1, 10.0, quotas, ttl_s=60) is None
    clock.now += 100
    refusal = book.admit_request("k", quotas)
    assert refusal.quota == "work_units_per_hour" and refusal.retry_after_s == pytest.approx(3500)


class FailingActor:
    """A ledger actor that is not there: every call fails."""

    def __getattr__(self, name: str):
        raise RuntimeError("actor died")


def test_an_unreachable_shared_ledger_falls_back_to_the_replicas_own():
    clock = Clock()
    found = []

    def find_actor():
        found.append(clock.now)
        return FailingActor()

    shared = _Ledger(find_actor, clock)
    assert shared.shared

    async def run() -> None:
        result, was_shared = await shared.call("admit_request", "k", {"requests_per_minute": 1})
        assert result is None and not was_shared
        result, _ = await shared.call("admit_request", "k", {"requests_per_minute": 1})
        assert result.quota == "requests_per_minute", "the fallback keeps counting"

    asyncio.run(run())
    assert len(found) == 1 and not shared.shared
    clock.now += 10
    assert shared.shared, "the shared ledger is tried again after a while"


def lease_states(quotas: dict) -> tuple[QuotaLease, _Ledger]:
    checker = gate({"id": "k", "hash": "sha256:" + "0" * 64, "scopes": ["detail"], "quotas": quotas})
    from serve_app.auth.gate import Caller

    caller = Caller("k", frozenset({"detail"}), KeyQuotas.model_validate(quotas))
    return checker.lease(caller), checker.ledger


def test_a_lease_is_released_on_every_exit_and_a_refusal_takes_nothing():
    async def run() -> None:
        lease, book = lease_states({"concurrent_crops": 2})
        await lease.reserve(crops=2, work_units=5.0)
        assert book._local.usage()["k"]["crops_in_flight"] == 2
        other, _ = lease_states({"concurrent_crops": 2})
        other._ledger = book
        with pytest.raises(AuthError) as raised:
            await other.reserve(crops=1, work_units=1.0)
        assert raised.value.status_code == 429 and raised.value.headers["Retry-After"] == "1"
        other.release()  # a refused lease holds nothing
        lease.release()
        lease.release()
        assert book._local.usage()["k"] == {"requests_last_minute": 0, "crops_in_flight": 0, "work_units_last_hour": 5}

    asyncio.run(run())


class SlowActor:
    """A shared ledger actor: each call runs on submission (Ray keeps one caller's calls in order)
    but its answer arrives only when the test says so."""

    def __init__(self, book: QuotaLedger) -> None:
        self.book = book
        self.pending: list[concurrent.futures.Future] = []

    def __getattr__(self, method: str):
        book, pending = self.book, self.pending

        class Method:
            @staticmethod
            def remote(*args):
                answer = getattr(book, method)(*args)
                future: concurrent.futures.Future = concurrent.futures.Future()
                pending.append(future)

                class Ref:
                    def future(self) -> concurrent.futures.Future:
                        future.answer = answer  # type: ignore[attr-defined]
                        return future

                return Ref()

        return Method()


def test_a_request_cancelled_while_it_reserves_still_releases_on_the_shared_ledger():
    """The client leaves while the reservation is on its way: the ``finally`` releases it anyway."""
    book = QuotaLedger()
    actor = SlowActor(book)
    lease, _ = lease_states({"concurrent_crops": 3})
    lease._ledger = _Ledger(lambda: actor)

    async def run() -> None:
        task = asyncio.ensure_future(lease.reserve(crops=3, work_units=0.0))
        await asyncio.sleep(0.01)
        assert book.usage()["k"]["crops_in_flight"] == 3 and not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        lease.release()  # what _run's finally does

    asyncio.run(run())
    assert book.usage() == {}
