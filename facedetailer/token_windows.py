"""CLIP token windows the way ComfyUI's tokenizer cuts a long prompt (Decision 9).

ComfyUI (0.3.64's ``SDTokenizer.tokenize_with_weights``) tokenizes a prompt group by group — a
group is a whole weighted segment, cut only where an ``embedding:`` begins
(:func:`facedetailer.prompt_weights.weighted_groups`) — and fills windows of ``max_length``
tokens (start token, up to 75 tokens, end token, padding). A group that no longer fits in the
current window moves whole to the next one, unless it is itself ``max_word_length`` tokens or
longer, in which case it is cut at the window's end, mid-word if need be: a plain prompt of more
than 75 tokens is one such group, cut at exactly 75. With emphasis every token also carries its
group's weight.
"""

from __future__ import annotations

from collections.abc import Sequence

CLIP_MAX_LENGTH = 77
MAX_WORD_LENGTH = 8  # groups of this many tokens or more may be cut across windows (ComfyUI's name)


def token_windows(
    group_tokens: Sequence[Sequence[int]],
    *,
    start_token: int,
    end_token: int,
    pad_token: int,
    max_length: int = CLIP_MAX_LENGTH,
    max_word_length: int = MAX_WORD_LENGTH,
) -> list[list[int]]:
    """Windows of exactly ``max_length`` ids from each group's tokens (no token: one empty window)."""
    windows, _ = weighted_token_windows(
        [(tokens, 1.0) for tokens in group_tokens],
        start_token=start_token,
        end_token=end_token,
        pad_token=pad_token,
        max_length=max_length,
        max_word_length=max_word_length,
    )
    return windows


def weighted_token_windows(
    weighted_groups: Sequence[tuple[Sequence[int], float]],
    *,
    start_token: int,
    end_token: int,
    pad_token: int,
    max_length: int = CLIP_MAX_LENGTH,
    max_word_length: int = MAX_WORD_LENGTH,
) -> tuple[list[list[int]], list[list[float]]]:
    """:func:`token_windows` of (tokens, weight) groups, and each place's weight alongside.

    Every token of a group (also the part of a long group that moves on) carries the group's
    weight; the start, end and padding tokens carry 1.0, as in ComfyUI.
    """
    room = max_length - 2  # tokens between the start and end tokens
    windows: list[list[int]] = []
    weights: list[list[float]] = []
    current: list[tuple[int, float]] = []

    def close() -> None:
        padding = room - len(current)
        windows.append([start_token, *(token for token, _ in current), end_token] + [pad_token] * padding)
        weights.append([1.0, *(weight for _, weight in current), 1.0] + [1.0] * padding)
        current.clear()

    for tokens, weight in weighted_groups:
        pending = [(token, weight) for token in tokens]
        splittable = len(pending) >= max_word_length
        while pending:
            free = room - len(current)
            if len(pending) <= free:
                current.extend(pending)
                break
            if splittable:
                current.extend(pending[:free])
                pending = pending[free:]
            close()
    close()
    return windows, weights


def empty_window(*, start_token: int, end_token: int, pad_token: int, max_length: int = CLIP_MAX_LENGTH) -> list[int]:
    """The empty prompt's window: ComfyUI's reference point for emphasis weights."""
    return [start_token, end_token] + [pad_token] * (max_length - 2)
