"""A refine call's sampler steps as a stream: what the inpainter replica sends back while it samples.

The engine reports every sampler step of a request's crops to its ``on_progress`` in the engine's
thread (:class:`~deployments.inpainter_engine.CropProgress`). :class:`StepFeed` turns each report
into a small picklable :class:`StepEvent` — with a preview image every ``preview_every`` steps,
made from the step's x0 by :mod:`deployments.latent_preview` — and hands it to the replica's event
loop. :func:`refine_steps` runs the refine call and yields the events in batches as they come,
then the call's :class:`~deployments.inpainter.RefineResult`: a Ray Serve streaming method
(``InpainterDeployment.refine_stream``, called with ``handle.options(stream=True)``) yields them.

Only callers that ask for steps take this path; a plain ``refine`` call has no listener, so the
engine does not even build the reports. Previews cost one small device → host copy per preview
(a synchronisation point on an accelerator); progress without previews reads no device value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deployments.inpainter_engine import CropProgress
from deployments.latent_preview import latent_format_of, latent_preview, preview_extent

logger = logging.getLogger(__name__)

__all__ = ["MIN_INTERVAL_S", "StepEvent", "StepFeed", "coalesce", "refine_steps"]

MIN_INTERVAL_S = 0.1  # at most ~10 messages a second per call, whatever the step rate


@dataclass(frozen=True)
class StepEvent:
    """Step ``step`` of ``steps`` of cycle ``cycle`` (from 0) of crop ``index`` of the call."""

    index: int
    cycle: int
    cycles: int
    step: int
    steps: int
    preview: np.ndarray | None = None  # uint8 [h, w, 3], one pixel per latent cell of the crop

    @property
    def done(self) -> int:
        """Steps done over all cycles (the cycles are assumed to have this cycle's steps each)."""
        return self.cycle * self.steps + self.step

    @property
    def total(self) -> int:
        return self.cycles * self.steps


def coalesce(events: Sequence[StepEvent]) -> list[StepEvent]:
    """The events worth sending of a backlog: every preview, and each crop's latest step.

    A consumer that fell behind gets one batch instead of every intermediate step; order is kept.
    """
    latest = {event.index: position for position, event in enumerate(events)}
    return [
        event for position, event in enumerate(events) if event.preview is not None or latest[event.index] == position
    ]


class StepFeed:
    """The engine's ``on_progress`` for one call: reports become :class:`StepEvent` s on ``loop``.

    ``preview_every`` = k > 0 adds a preview to every k-th step of each cycle and to its last
    step. A preview that cannot be made (a latent format without a map) switches previews off
    for the call, with one log line; progress goes on.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        preview_every: int = 0,
        latent_format: str = "sd15",
        extents: Sequence[tuple[int, int]] = (),
        synchronize: Callable[[], None] = lambda: None,
    ) -> None:
        if preview_every < 0:
            raise ValueError(f"preview_every must be >= 0, got {preview_every}")
        self.preview_every = preview_every
        self.latent_format = latent_format
        self.extents = list(extents)
        self._synchronize = synchronize
        self._loop = loop
        self._queue: asyncio.Queue[StepEvent] = asyncio.Queue()

    @classmethod
    def for_jobs(cls, inpainter: Any, jobs: Sequence[Any], preview_every: int = 0) -> StepFeed:
        """A feed for ``jobs`` on ``inpainter`` (its latent format, each crop's latent extent)."""
        return cls(
            asyncio.get_running_loop(),
            preview_every=preview_every,
            latent_format=latent_format_of(inpainter.components),
            extents=[preview_extent(job.image.shape, inpainter.vae_scale_factor) for job in jobs],
            synchronize=inpainter.synchronize,
        )

    def __call__(self, progress: CropProgress) -> None:
        """In the engine's thread: quick, and never keeps the latent."""
        preview = None
        if self.preview_every and (progress.step % self.preview_every == 0 or progress.step == progress.steps):
            preview = self._preview(progress)
        event = StepEvent(progress.index, progress.cycle, progress.cycles, progress.step, progress.steps, preview)
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def _preview(self, progress: CropProgress) -> np.ndarray | None:
        extent = self.extents[progress.index] if progress.index < len(self.extents) else None
        try:
            self._synchronize()  # the latent is read on the host
            return latent_preview(progress.latent, self.latent_format, extent)
        except ValueError as error:
            logger.warning("no step previews for this call: %s", error)
            self.preview_every = 0
            return None

    async def next_batch(self) -> list[StepEvent]:
        """The next event and whatever else is waiting, coalesced (waits for at least one)."""
        first = await self._queue.get()
        return coalesce([first, *self.drain()])

    def drain(self) -> list[StepEvent]:
        events = []
        while not self._queue.empty():
            events.append(self._queue.get_nowait())
        return events


async def refine_steps(
    refine: Callable[[StepFeed], Awaitable[Any]], feed: StepFeed, min_interval_s: float = MIN_INTERVAL_S
) -> AsyncIterator[list[StepEvent] | Any]:
    """Run ``refine(feed)``; yield lists of step events while it runs, then its result.

    A batch is sent at most every ``min_interval_s``: the steps that come meanwhile join it,
    coalesced (each crop's latest step, every preview), so fast steps cost few messages; the
    result is never held back. The call's error is raised after the steps it reported; closing
    the iterator (the caller cancelled the stream) cancels the call, which takes its crops out
    of the engine.
    """
    task = asyncio.ensure_future(refine(feed))
    getter: asyncio.Future | None = None
    try:
        while True:
            getter = asyncio.ensure_future(feed.next_batch())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                batch = getter.result()
                if min_interval_s > 0 and not task.done():
                    await asyncio.wait({task}, timeout=min_interval_s)  # ends early when the call does
                    batch = coalesce(batch + feed.drain())
                yield batch
                continue
            getter.cancel()
            break
        rest = coalesce(feed.drain())
        if rest:
            yield rest
        yield task.result()
    finally:
        if getter is not None and not getter.done():
            getter.cancel()
        if not task.done():
            task.cancel()
