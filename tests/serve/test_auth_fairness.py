"""One key flooding the inpainter does not starve another: the ingress' stages pass each key's id and
weight to the engine's fair queue (``serve_app/auth``, ``deployments/fair_queue.py``).

In process, no Ray: the inpainter deployment class with a ``sim://`` model (each UNet call sleeps
5 ms), reached through the ingress' :class:`HandleStages` exactly as the served app calls it. Key A
floods with 8 concurrent requests of 6 crops; key B then sends one crop. With fair queueing B is
admitted at the next free slot and finishes long before A's backlog; with one first-come queue
(``auth.fair_queueing: false``, the old behaviour) it waits behind all of it. The figures on a
simulated A100 are in docs/auth.md (benchmarks/fairness.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from deployments.inpainter import RefineJob, SamplingSettings
from deployments.serving import InpainterDeployment
from serve_app.auth import AuthGate
from serve_app.config import AuthArgs
from serve_app.ingress import HandleStages
from tests.serve.test_auth_keys import entry

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SETTINGS = SamplingSettings(steps=4, denoise=0.5, cfg=1.0)
FLOOD_CLIENTS, FLOOD_CROPS = 8, 6


class Response:
    """What a deployment handle's ``.remote()`` returns, for an in-process coroutine."""

    def __init__(self, coroutine: Any) -> None:
        self.task = asyncio.ensure_future(coroutine)

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.task.cancel()


class Handle:
    """``handle.refine.remote(...)`` on a deployment object in this process."""

    def __init__(self, deployment: InpainterDeployment) -> None:
        self.refine = type("Method", (), {"remote": staticmethod(lambda *a, **k: Response(deployment.refine(*a, **k)))})


def job(seed: int) -> RefineJob:
    image = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return RefineJob(image=image, noise_mask=None, positive=("a face",), negative=(), seed=seed)


@pytest.fixture(scope="module")
def inpainter() -> InpainterDeployment:
    deployment = InpainterDeployment("sim://sd15?a=0.005&b=0", device="cpu", max_batch_size=4, max_queued_crops=1000)
    asyncio.run(deployment.refine([job(0)], SETTINGS))  # the first call sets up the sampler (seconds)
    yield deployment
    deployment.reporter.stop()
    for loaded in deployment.loaded.values():
        loaded.engine.stop()


async def flood_then_one(inpainter: InpainterDeployment, gate: AuthGate) -> tuple[float, list[float]]:
    """Seconds until B's crop is back, and until each of A's requests is back (from the flood's start)."""
    a = gate.authenticate("Bearer key-a", "detail")
    b = gate.authenticate("Bearer key-b", "detail")
    handle = Handle(inpainter)

    def stages(caller) -> HandleStages:
        return HandleStages(None, handle, None, None, tenant=gate.tenant(caller))  # type: ignore[arg-type]

    started = time.perf_counter()

    async def timed(coroutine: Any) -> float:
        await coroutine
        return time.perf_counter() - started

    submitted = inpainter.snapshot()["crops_submitted"]
    flood = [
        asyncio.ensure_future(timed(stages(a).refine([job(10 * k + i) for i in range(FLOOD_CROPS)], SETTINGS)))
        for k in range(FLOOD_CLIENTS)
    ]
    while inpainter.snapshot()["crops_submitted"] < submitted + FLOOD_CLIENTS * FLOOD_CROPS:
        await asyncio.sleep(0.002)  # until the whole flood is queued: 48 crops, 4 sampled at a time
    polite = await timed(stages(b).refine([job(999)], SETTINGS))
    return polite, list(await asyncio.gather(*flood))


def gate_of(fair: bool) -> AuthGate:
    keys = [entry("a", "key-a", ["detail"]), entry("b", "key-b", ["detail"])]
    return AuthGate(AuthArgs.model_validate({"keys": keys, "fair_queueing": fair}), 60, find_ledger=None)


def test_a_flooding_key_does_not_starve_another_and_the_old_fifo_would(inpainter):
    fair_b, fair_a = asyncio.run(flood_then_one(inpainter, gate_of(True)))
    fifo_b, fifo_a = asyncio.run(flood_then_one(inpainter, gate_of(False)))
    # fair: B is admitted at the next free slot, and is back before most of A's requests
    assert sum(done < fair_b for done in fair_a) <= 2, (fair_b, sorted(fair_a))
    assert fair_b < 0.4 * max(fair_a), (fair_b, max(fair_a))
    # one queue for everyone: B waits behind the whole flood
    assert sum(done < fifo_b for done in fifo_a) >= FLOOD_CLIENTS - 1, (fifo_b, sorted(fifo_a))
    assert fifo_b > 3 * fair_b
