"""Weighted start-time fair queueing of waiting crops (deployments/fair_queue.py) and the engine's use of it."""

from __future__ import annotations

import pytest

from deployments.fair_queue import FairQueue
from tests.deployments.test_inpainter_engine import Fake, engine, run_all


def drain(queue: FairQueue) -> list:
    return [queue.pop() for _ in range(len(queue))]


def test_one_tenant_is_first_in_first_out():
    queue: FairQueue[str] = FairQueue()
    queue.extend(["a", "b"], [5.0, 1.0])
    queue.extend(["c"], [0.1])
    assert drain(queue) == ["a", "b", "c"]
    assert not queue and len(queue) == 0


def test_a_tenant_arriving_behind_a_flood_is_served_next_not_last():
    queue: FairQueue[str] = FairQueue()
    queue.extend([f"flood{i}" for i in range(20)], [1.0] * 20, tenant="flooder")
    assert queue.pop() == "flood0"
    queue.extend(["mine"], [1.0], tenant="polite")
    # start tags: flood1 = 1, mine = max(V=0, 0) = 0 → mine first
    assert queue.pop() == "mine"
    assert drain(queue) == [f"flood{i}" for i in range(1, 20)]


def test_equal_tenants_alternate_and_weights_set_the_shares():
    queue: FairQueue[str] = FairQueue()
    queue.extend([f"a{i}" for i in range(6)], [1.0] * 6, tenant="a")
    queue.extend([f"b{i}" for i in range(6)], [1.0] * 6, tenant="b")
    assert drain(queue)[:6] == ["a0", "b0", "a1", "b1", "a2", "b2"]
    queue.extend([f"a{i}" for i in range(9)], [1.0] * 9, tenant="a", weight=2.0)
    queue.extend([f"b{i}" for i in range(9)], [1.0] * 9, tenant="b", weight=1.0)
    first_nine = drain(queue)[:9]
    assert sum(name.startswith("a") for name in first_nine) == 6  # a gets two admissions for each of b's


def test_costs_count_a_big_crop_as_many_small_ones():
    queue: FairQueue[str] = FairQueue()
    queue.extend(["big", "big2"], [4.0, 4.0], tenant="big")
    queue.extend([f"s{i}" for i in range(5)], [1.0] * 5, tenant="small")
    order = drain(queue)
    assert order.index("big2") > order.index("s3")  # big2 starts at tag 4, the small ones at 0…4


def test_removed_items_leave_and_the_rest_keep_their_order():
    queue: FairQueue[str] = FairQueue()
    queue.extend(["a0", "a1", "a2"], [1.0] * 3, tenant="a")
    queue.extend(["b0", "b1"], [1.0] * 2, tenant="b")
    assert sorted(queue.remove_if(lambda item: item.endswith("1"))) == ["a1", "b1"]
    assert len(queue) == 3
    assert queue.waiting_by_tenant() == {"a": 2, "b": 1}
    assert drain(queue) == ["a0", "b0", "a2"]
    with pytest.raises(IndexError):
        queue.pop()
    with pytest.raises(ValueError, match="weight"):
        queue.extend(["x"], [1.0], weight=0.0)


def test_the_engine_admits_a_second_tenant_before_the_first_tenants_backlog():
    loop, backend = engine(max_batch_size=2)
    flood = loop.submit([Fake(f"f{i}", steps=2) for i in range(8)], tenant="flooder")
    polite = loop.submit([Fake("p", steps=2)], tenant="polite")
    run_all(loop)
    calls = [names for _, names in backend.calls]
    assert calls[0] == ["f0", "p"], f"the polite crop waited behind the flood: {calls}"  # both start tags 0
    assert calls[2:4] == [["f1", "f2"], ["f1", "f2"]]
    assert flood.future.result(timeout=0) == [2.0] * 8 and polite.future.result(timeout=0) == [2.0]


def test_without_tenants_the_engine_keeps_arrival_order():
    loop, backend = engine(max_batch_size=1)
    loop.submit([Fake("a0", steps=1), Fake("a1", steps=1)])
    loop.submit([Fake("b0", steps=1)])
    run_all(loop)
    assert [names for _, names in backend.calls] == [["a0"], ["a1"], ["b0"]]
