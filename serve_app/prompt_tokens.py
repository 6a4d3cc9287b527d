"""Prompt tokens counted at the ingress with the checkpoint's own tokenizers (``limits.max_prompt_tokens``).

The ingress holds no model. It asks the inpainter for a checkpoint's tokenizers once (a few MB,
kept per checkpoint) and counts a prompt's CLIP windows exactly as the inpainter will cut them
(:func:`deployments.inpainter.count_prompt_windows`): ``positive`` and ``negative`` as sent before
detection, every face's prompt (after its wildcard) before the first inpainter call. The empty
prompt is one window and needs no tokenizer, so a request without prompts never waits for one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from deployments.inpainter import count_prompt_windows

CACHED_PROMPTS = 256  # distinct prompts whose window count is remembered per checkpoint


class PromptWindows:
    """Counts the CLIP windows of a prompt's chunks with one checkpoint's tokenizers (remembered)."""

    def __init__(self, tokenizers: Sequence[tuple[Any, int]] | None) -> None:
        self.tokenizers = tokenizers
        self._counted: OrderedDict[tuple[str, ...], int] = OrderedDict()

    def __call__(self, chunks: Sequence[str]) -> int:
        key = tuple(chunks)
        if not any(key):  # () or (""): the empty prompt's one window
            return 1
        if self.tokenizers is None:
            raise RuntimeError("prompt windows counted before the checkpoint's tokenizers were loaded")
        counted = self._counted.get(key)
        if counted is None:
            counted = count_prompt_windows(self.tokenizers, key)
            self._counted[key] = counted
            while len(self._counted) > CACHED_PROMPTS:
                self._counted.popitem(last=False)
        return counted


class PromptTokenCounter:
    """One :class:`PromptWindows` per checkpoint; ``fetch(checkpoint)`` asks the inpainter for its tokenizers."""

    def __init__(self, fetch: Callable[[str], Awaitable[Sequence[tuple[Any, int]]]]) -> None:
        self.fetch = fetch
        self._loaded: dict[str, PromptWindows] = {}

    async def windows(self, checkpoint: str, needed: bool = True) -> PromptWindows:
        """The checkpoint's counter; without ``needed`` (no prompt text at all) no tokenizer is fetched."""
        loaded = self._loaded.get(checkpoint)
        if loaded is not None:
            return loaded
        if not needed:
            return PromptWindows(None)
        loaded = PromptWindows(await self.fetch(checkpoint))
        self._loaded[checkpoint] = loaded
        return loaded
