"""Step events with latent previews, from the engine to a replica's stream (no Ray).

The preview map is ComfyUI's Latent2RGB arithmetic, checked on values computed by hand; on the
tiny SD model the feed reports every step, previews at every k-th step and the last, each cut
to the crop's latent cells, and the last preview is the map of the latent the crop is decoded
from. ``refine_steps`` yields the steps in batches, then the result, and closing it cancels
the call.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from deployments.inpainter import Inpainter, RefineJob, SamplingSettings
from deployments.inpainter_engine import CropProgress
from deployments.latent_preview import LATENT_RGB, LatentRGB, latent_format_of, latent_preview, preview_extent
from deployments.step_progress import StepEvent, StepFeed, coalesce, refine_steps

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_the_map_is_comfyuis_linear_map_then_minus_one_one_to_bytes():
    latent = torch.zeros(1, 4, 2, 3)
    latent[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # channel 0 alone: the first row of factors
    latent[0, :, 1, 2] = torch.tensor([0.5, -1.0, 2.0, 0.25])
    preview = latent_preview(latent, "sdxl")
    assert preview.shape == (2, 3, 3) and preview.dtype == np.uint8
    factors, bias = np.array(LATENT_RGB["sdxl"].factors), np.array(LATENT_RGB["sdxl"].bias)
    for (row, col), values in {(0, 0): [1, 0, 0, 0], (1, 2): [0.5, -1, 2, 0.25], (0, 1): [0, 0, 0, 0]}.items():
        rgb = np.array(values, np.float64) @ factors + bias
        expected = np.floor(np.clip((rgb + 1) / 2, 0, 1) * 255).astype(np.uint8)
        assert np.abs(preview[row, col].astype(int) - expected).max() <= 1, (row, col)  # float32 vs float64
    # SD 1.x has no bias: a zero latent is mid-grey, 127 (255 · 0.5 truncated)
    assert np.all(latent_preview(torch.zeros(1, 4, 1, 1), "sd15") == 127)


def test_formats_and_extent():
    assert set(LATENT_RGB) >= {"sd15", "sdxl"}
    assert all(mapping.channels == 4 for mapping in LATENT_RGB.values())
    latent = torch.randn(1, 4, 8, 8)
    assert latent_preview(latent, "sd15", (5, 3)).shape == (5, 3, 3)
    assert preview_extent((40, 57, 3), 8) == (5, 8)
    with pytest.raises(ValueError, match="no latent"):
        latent_preview(latent, "flux")
    sixteen = LatentRGB(factors=((0.1, 0.1, 0.1),) * 16)
    assert sixteen.channels == 16
    LATENT_RGB["test16"] = sixteen
    try:
        assert latent_preview(torch.zeros(1, 16, 2, 2), "test16").shape == (2, 2, 3)
        with pytest.raises(ValueError, match="16 channels, the latent 4"):
            latent_preview(latent, "test16")
    finally:
        del LATENT_RGB["test16"]


def test_coalesce_keeps_previews_and_each_crops_latest_step():
    preview = np.zeros((1, 1, 3), np.uint8)
    events = [
        StepEvent(0, 0, 1, 1, 4),
        StepEvent(1, 0, 1, 1, 4),
        StepEvent(0, 0, 1, 2, 4, preview),
        StepEvent(0, 0, 1, 3, 4),
        StepEvent(1, 0, 1, 2, 4),
    ]
    kept = coalesce(events)
    assert [(event.index, event.step) for event in kept] == [(0, 2), (0, 3), (1, 2)]
    assert StepEvent(0, 1, 2, 3, 4).done == 7 and StepEvent(0, 1, 2, 3, 4).total == 8


@pytest.fixture(scope="module")
def inpainter(tiny_sd: dict) -> Inpainter:
    return Inpainter(tiny_sd["pipeline"], device="cpu", max_batch_size=8)


def crop_jobs() -> list[RefineJob]:
    rng = np.random.default_rng(5)
    shapes = [(64, 48), (44, 60)]  # the second is padded to the latent grid (48 × 64)
    return [RefineJob(image=rng.integers(0, 256, (*shape, 3), dtype=np.uint8), noise_mask=None,
                      positive=("a face",), negative=("",), seed=11 + i) for i, shape in enumerate(shapes)]  # fmt: skip


@pytest.mark.models
def test_the_feed_reports_every_step_with_previews_every_k_and_the_last(inpainter, monkeypatch):
    jobs = crop_jobs()
    settings = SamplingSettings(steps=3, denoise=0.6, cfg=7.0, cycle=2)
    decoded: list[torch.Tensor] = []
    original = inpainter._decode
    monkeypatch.setattr(inpainter, "_decode", lambda latents: decoded.extend(latents.clone()) or original(latents))
    assert latent_format_of(inpainter.components) == "sd15"

    async def scenario() -> list[StepEvent]:
        feed = StepFeed.for_jobs(inpainter, jobs, preview_every=2)
        request = inpainter.submit(jobs, settings, on_progress=feed)
        await asyncio.to_thread(inpainter.engine.wait, request)
        await asyncio.sleep(0)  # the last call_soon_threadsafe callbacks
        return feed.drain()

    events = asyncio.run(scenario())
    for index, job in enumerate(jobs):
        mine = [event for event in events if event.index == index]
        assert [(event.cycle, event.step) for event in mine] == [(c, s) for c in range(2) for s in range(1, 4)]
        with_preview = [(event.cycle, event.step) for event in mine if event.preview is not None]
        assert with_preview == [(c, s) for c in range(2) for s in (2, 3)]
        extent = preview_extent(job.image.shape, inpainter.vae_scale_factor)
        assert all(event.preview.shape == (*extent, 3) for event in mine if event.preview is not None)
        # the last preview is the map of the latent this crop is decoded from
        last = mine[-1].preview
        assert any(np.array_equal(last, latent_preview(latent[None], "sd15", extent)) for latent in decoded)


@pytest.mark.models
def test_a_feed_without_previews_never_reads_the_latent(inpainter):
    class Untouchable:
        shape = (1, 4, 8, 8)

        def __getitem__(self, key):
            raise AssertionError("the latent was read")

    async def scenario() -> list[StepEvent]:
        feed = StepFeed(asyncio.get_running_loop(), preview_every=0)
        for step in range(1, 4):
            feed(CropProgress(0, 0, 1, step, 3, Untouchable()))
        await asyncio.sleep(0)
        return feed.drain()

    assert [event.step for event in asyncio.run(scenario())] == [1, 2, 3]


def test_refine_steps_yields_batches_then_the_result_and_closing_cancels_the_call():
    async def scenario() -> tuple[list, bool]:
        loop = asyncio.get_running_loop()
        cancelled = asyncio.Event()

        async def refine(feed: StepFeed) -> str:
            for step in (1, 2):
                feed(CropProgress(0, 0, 1, step, 2, None))
                await asyncio.sleep(0.01)
            return "RESULT"

        items = [item async for item in refine_steps(refine, StepFeed(loop), min_interval_s=0)]

        async def endless(feed: StepFeed) -> None:
            feed(CropProgress(0, 0, 1, 1, 9, None))
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        stream = refine_steps(endless, StepFeed(loop), min_interval_s=0)
        first = await stream.__anext__()
        await stream.aclose()  # the caller cancelled the stream
        await asyncio.wait_for(cancelled.wait(), 2)
        return items + [first], cancelled.is_set()

    items, cancelled = asyncio.run(scenario())
    assert [[event.step for event in batch] for batch in items[:-2]] == [[1], [2]]
    assert items[-2] == "RESULT" and [event.step for event in items[-1]] == [1] and cancelled


def test_fast_steps_are_sent_in_few_batches_and_the_result_is_not_held_back():
    async def scenario() -> tuple[list, float]:
        loop = asyncio.get_running_loop()

        async def refine(feed: StepFeed) -> str:
            for step in range(1, 41):  # 40 steps of two crops in ~0.4 s
                for index in (0, 1):
                    feed(CropProgress(index, 0, 1, step, 40, None))
                await asyncio.sleep(0.01)
            return "RESULT"

        started = loop.time()
        items = [item async for item in refine_steps(refine, StepFeed(loop), min_interval_s=0.1)]
        return items, loop.time() - started

    items, seconds = asyncio.run(scenario())
    batches = items[:-1]
    assert items[-1] == "RESULT" and seconds < 0.4 + 0.1 + 0.2
    assert len(batches) <= 8, f"{len(batches)} batches for 40 steps over ~0.4 s"
    assert all(len(batch) <= 2 for batch in batches), "each crop's latest step only"
    assert [event.step for event in batches[-1]] == [40, 40], "the last step is always sent"
