"""The engine loop with a fake backend: admission, grouping, joins, cancellation, failures, stats.

No model: each fake crop is a counter that asks for ``steps`` evaluations, each answer adds
the crop's own value to its latent, so every crop's result says exactly which answers it got.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import pytest
import torch

from deployments.inpainter_engine import EngineBusyError, EngineCrop, InpaintEngine, RequestCancelledError


@dataclass(frozen=True)
class FakeRequest:
    crop: str
    step: int
    uncond: bool = False


@dataclass
class Fake:
    """Payload of a fake crop: its name, how many evaluations, its group, failure switches."""

    name: str
    steps: int = 3
    key: Hashable = "a"
    cycles: int = 1
    uncond: bool = False
    fail_prepare: bool = False
    fail_at_step: int | None = None
    fail_finish: bool = False
    nan: bool = False


def counting_stage(crop: EngineCrop, latent: torch.Tensor):
    fake: Fake = crop.payload
    for step in range(fake.steps):
        response = yield FakeRequest(fake.name, step, fake.uncond)
        assert response == (fake.name, step), f"{fake.name} got the answer meant for {response}"
        latent = latent + 1
    return latent * float("nan") if fake.nan else latent


@dataclass
class FakeBackend:
    calls: list[tuple[Hashable, list[str]]] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    def prepare(self, crops: Sequence[EngineCrop]) -> None:
        for crop in crops:
            if crop.payload.fail_prepare:
                raise ValueError(f"cannot prepare {crop.payload.name}")
        for crop in crops:
            self.prepared.append(crop.payload.name)
            crop.latent = torch.zeros(1)
            crop.group_key = crop.payload.key
            crop.stages = [counting_stage] * crop.payload.cycles

    def evaluate(self, key: Hashable, calls: Sequence[tuple[EngineCrop, FakeRequest]]) -> list[tuple[str, int]]:
        for crop, request in calls:
            assert crop.group_key == key
            if crop.payload.fail_at_step == request.step:
                raise RuntimeError(f"UNet failed on {crop.payload.name}")
        self.calls.append((key, [crop.payload.name for crop, _ in calls]))
        return [(request.crop, request.step) for _, request in calls]

    def finish(self, crops: Sequence[EngineCrop]) -> list[float]:
        if any(crop.payload.fail_finish for crop in crops):
            raise RuntimeError("decode failed")
        self.finished.extend(crop.payload.name for crop in crops)
        return [float(crop.latent.item()) for crop in crops]

    def order_groups(self, keys: Sequence[Hashable]) -> list[Hashable]:
        return sorted(keys)


def engine(max_batch_size: int = 8, max_queued_crops: int = 64) -> tuple[InpaintEngine, FakeBackend]:
    backend = FakeBackend()
    return InpaintEngine(backend, max_batch_size=max_batch_size, max_queued_crops=max_queued_crops), backend


def run_all(engine: InpaintEngine) -> None:
    for _ in range(1000):
        if not engine.step():
            return
    raise AssertionError("the engine did not go idle")


def test_a_lone_crop_starts_at_the_first_step_and_finishes_after_its_evaluations():
    loop, backend = engine()
    request = loop.submit([Fake("x", steps=3)])
    assert loop.step()
    assert backend.calls == [("a", ["x"])], "no batch wait: the first step already evaluates the crop"
    run_all(loop)
    assert request.future.result(timeout=0) == [3.0]
    assert [names for _, names in backend.calls] == [["x"]] * 3
    assert request.queue_wait_s < 1.0


def test_crops_with_different_step_counts_share_calls_and_a_late_crop_joins_at_the_next_step():
    loop, backend = engine()
    first = loop.submit([Fake("short", steps=2), Fake("long", steps=5)])
    loop.step()
    late = loop.submit([Fake("late", steps=2)])
    run_all(loop)
    assert [names for _, names in backend.calls] == [
        ["short", "long"],
        ["short", "long", "late"],  # joined at the step after it arrived
        ["long", "late"],  # short left after its 2 evaluations
        ["long"],
        ["long"],
    ]
    assert first.future.result(timeout=0) == [2.0, 5.0] and late.future.result(timeout=0) == [2.0]
    snapshot = loop.snapshot()
    assert snapshot["unet_batch_sizes"] == {1: 2, 2: 2, 3: 1} and snapshot["unet_crop_evaluations"] == 9


def test_groups_run_as_separate_calls_in_the_same_step_and_rows_count_uncond():
    loop, backend = engine()
    loop.submit([Fake("a1", key="a"), Fake("b1", key="b", uncond=True), Fake("a2", key="a", uncond=True)])
    loop.step()
    assert backend.calls == [("a", ["a1", "a2"]), ("b", ["b1"])]
    run_all(loop)
    assert loop.snapshot()["unet_rows"] == 3 * (2 + 1 + 2)


def test_the_active_set_is_bounded_and_admission_is_fifo():
    loop, backend = engine(max_batch_size=2)
    loop.submit([Fake("r1a", steps=2), Fake("r1b", steps=4)])
    loop.submit([Fake("r2a", steps=1)])
    loop.submit([Fake("r3a", steps=1)])
    run_all(loop)
    assert [names for _, names in backend.calls] == [
        ["r1a", "r1b"],
        ["r1a", "r1b"],
        ["r1b", "r2a"],  # r1a left: the head of the queue (r2a) takes its place
        ["r1b", "r3a"],
    ]
    assert all(len(names) <= 2 for _, names in backend.calls)
    assert backend.prepared == ["r1a", "r1b", "r2a", "r3a"]


def test_a_full_queue_refuses_with_a_clear_error_but_an_empty_queue_takes_a_large_request():
    loop, _ = engine(max_batch_size=1, max_queued_crops=3)
    big = loop.submit([Fake(f"c{i}") for i in range(5)])  # larger than the bound, queue empty: accepted
    with pytest.raises(EngineBusyError, match="queue is full"):
        loop.submit([Fake("more")])
    run_all(loop)
    assert big.future.result(timeout=0) == [3.0] * 5
    assert loop.snapshot()["requests_rejected"] == 1
    loop.submit([Fake("after")])  # the queue drained: accepted again


def test_a_cancelled_request_leaves_at_the_next_step_and_others_continue():
    loop, backend = engine(max_batch_size=2)
    cancelled = loop.submit([Fake("gone", steps=100), Fake("queued-gone", steps=100)])
    kept = loop.submit([Fake("kept", steps=4)])
    loop.step()
    loop.step()
    loop.cancel(cancelled)
    run_all(loop)
    assert [names for _, names in backend.calls][2:] == [["kept"]] * 4
    assert "queued-gone" not in backend.prepared or "queued-gone" not in backend.calls[-1][1]
    with pytest.raises(RequestCancelledError):
        cancelled.future.result(timeout=0)
    assert kept.future.result(timeout=0) == [4.0]
    assert loop.snapshot()["crops_cancelled"] == 2 and loop.snapshot()["active_crops"] == 0


def test_a_cancelled_queued_request_is_never_prepared():
    loop, backend = engine(max_batch_size=1)
    loop.submit([Fake("running", steps=3)])
    waiting = loop.submit([Fake("waiting", steps=3)])
    loop.step()
    loop.cancel(waiting)
    run_all(loop)
    assert backend.prepared == ["running"]


@pytest.mark.parametrize(
    "bad",
    [Fake("bad", fail_prepare=True), Fake("bad", fail_at_step=1), Fake("bad", fail_finish=True), Fake("bad", nan=True)],
    ids=["prepare", "unet", "finish", "non-finite"],
)
def test_a_failing_crop_fails_alone(bad: Fake):
    loop, backend = engine()
    good = loop.submit([Fake("good1", steps=3)])
    failing = loop.submit([bad, Fake("sibling", steps=6)])
    other = loop.submit([Fake("good2", steps=2)])
    run_all(loop)
    assert good.future.result(timeout=0) == [3.0] and other.future.result(timeout=0) == [2.0]
    with pytest.raises((ValueError, RuntimeError, FloatingPointError)):
        failing.future.result(timeout=0)
    sibling_calls = sum("sibling" in names for _, names in backend.calls)
    assert sibling_calls < 6, "the failed request's other crop was dropped, not run to the end"
    assert loop.snapshot()["crops_failed"] == 1


def test_cycles_chain_latents_and_stages_without_model_calls_pass_through():
    loop, backend = engine()
    request = loop.submit([Fake("three-cycles", steps=2, cycles=3), Fake("no-steps", steps=0, cycles=2)])
    run_all(loop)
    assert request.future.result(timeout=0) == [6.0, 0.0]
    assert [names for _, names in backend.calls] == [["three-cycles"]] * 6


def test_the_background_loop_serves_other_threads_and_stops():
    loop, backend = engine()
    loop.start()
    try:
        results = []
        threads = [
            threading.Thread(target=lambda i=i: results.append(loop.run([Fake(f"t{i}", steps=i + 1)])))
            for i in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert sorted(results) == [[1.0], [2.0], [3.0], [4.0]]
        started = time.monotonic()
        assert loop.run([Fake("lone", steps=1)]) == [1.0]
        assert time.monotonic() - started < 1.0
    finally:
        loop.stop()
    assert not loop.running


def test_reconfigure_changes_the_bounds_at_the_next_step():
    loop, backend = engine(max_batch_size=4)
    loop.submit([Fake(f"c{i}", steps=2) for i in range(4)])
    loop.configure(max_batch_size=1)
    run_all(loop)
    assert max(len(names) for _, names in backend.calls) == 1
    with pytest.raises(ValueError):
        loop.configure(max_batch_size=0)


def test_a_request_keeps_its_engine_time_and_the_snapshot_reports_the_stepping_threads_torch_threads():
    loop, _ = engine()
    request = loop.submit([Fake("x", steps=3)])
    running = request.engine_s
    time.sleep(0.01)
    assert request.engine_s > running, "unfinished: the engine time grows"
    run_all(loop)
    finished = request.engine_s
    time.sleep(0.01)
    assert request.engine_s == finished >= request.queue_wait_s, "finished: fixed at the moment its results were ready"
    loop.start()  # the background thread reports what its own model calls use
    try:
        assert loop.run([Fake("y", steps=1)]) == [1.0]
        assert loop.snapshot()["torch_threads"] == torch.get_num_threads()
    finally:
        loop.stop()
