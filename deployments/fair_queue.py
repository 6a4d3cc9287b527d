"""Weighted fair queueing of the inpainter engine's waiting crops across tenants (API keys).

With one FIFO queue a caller that submits 64 crops makes the next caller wait for all of them.
Start-time fair queueing (Goyal et al., 1996) gives each tenant a share of admissions in
proportion to its weight instead: a crop of cost ``c`` queued by a tenant of weight ``w`` gets
the start tag ``S = max(V, F_tenant)`` and moves the tenant's finish tag to ``F_tenant = S + c/w``;
the engine admits the waiting crop with the smallest start tag (arrival order among equals) and
the system's virtual time ``V`` becomes that tag. A tenant that was idle starts at ``V``, so it is
never punished for having waited, and never credited either. Within one tenant the order stays
first in, first out; with a single tenant the queue is exactly the old FIFO.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["FairQueue"]

Item = TypeVar("Item")


@dataclass
class _Tenant(Generic[Item]):
    weight: float = 1.0
    finish: float = 0.0  # the finish tag of its last queued item
    waiting: deque[tuple[float, int, Item]] = field(default_factory=deque)  # (start tag, arrival, item)


class FairQueue(Generic[Item]):
    """Per-tenant FIFO queues served by smallest start tag; not thread-safe (the engine holds its lock)."""

    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant[Item]] = {}
        self._virtual_time = 0.0
        self._arrivals = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Item]:
        """Every waiting item, tenant by tenant (for inspection, not in admission order)."""
        for tenant in self._tenants.values():
            for _, _, item in tenant.waiting:
                yield item

    def extend(self, items: list[Item], costs: list[float], tenant: str = "", weight: float = 1.0) -> None:
        """Queue a tenant's items in order; ``costs`` are their work (any positive unit)."""
        if weight <= 0:
            raise ValueError(f"a tenant's weight must be > 0, got {weight}")
        state = self._tenants.setdefault(tenant, _Tenant())
        state.weight = float(weight)
        for item, cost in zip(items, costs, strict=True):
            start = max(self._virtual_time, state.finish)
            state.finish = start + max(float(cost), 0.0) / state.weight
            state.waiting.append((start, next(self._arrivals), item))
            self._size += 1

    def pop(self) -> Item:
        """The waiting item with the smallest start tag (earliest arrival among equal tags)."""
        heads = [(tenant.waiting[0][0], tenant.waiting[0][1], name) for name, tenant in self._tenants.items()
                 if tenant.waiting]  # fmt: skip
        if not heads:
            raise IndexError("pop from an empty FairQueue")
        start, _, name = heapq.nsmallest(1, heads)[0]
        tenant = self._tenants[name]
        _, _, item = tenant.waiting.popleft()
        self._size -= 1
        self._virtual_time = max(self._virtual_time, start)
        self._forget_idle(name)
        return item

    def remove_if(self, predicate: Callable[[Item], bool]) -> list[Item]:
        """Take out (and return) the waiting items ``predicate`` selects; the others keep their tags."""
        removed: list[Item] = []
        for name, tenant in list(self._tenants.items()):
            kept = deque(entry for entry in tenant.waiting if not predicate(entry[2]))
            removed += [entry[2] for entry in tenant.waiting if predicate(entry[2])]
            tenant.waiting = kept
            self._forget_idle(name)
        self._size -= len(removed)
        return removed

    def clear(self) -> list[Item]:
        """Empty the queue; returns what was waiting."""
        return self.remove_if(lambda _: True)

    def waiting_by_tenant(self) -> dict[str, int]:
        return {name: len(tenant.waiting) for name, tenant in self._tenants.items() if tenant.waiting}

    def _forget_idle(self, name: str) -> None:
        """Drop an idle tenant whose finish tag the virtual time has passed: it would start at V anyway."""
        tenant = self._tenants[name]
        if not tenant.waiting and tenant.finish <= self._virtual_time:
            del self._tenants[name]
