"""CLIP token windows the way ComfyUI's tokenizer cuts a long prompt (Decision 9).

ComfyUI tokenizes a prompt word by word (the text split on spaces, newlines read as spaces) and
fills windows of ``max_length`` tokens (start token, up to 75 tokens, end token, padding). A word
that no longer fits in the current window moves whole to the next one, unless it is itself
``max_word_length`` tokens or longer, in which case it is split at the window's end. A plain
75-token cut would instead split short words across two windows.
"""

from __future__ import annotations

from collections.abc import Sequence

CLIP_MAX_LENGTH = 77
MAX_WORD_LENGTH = 8  # words of this many tokens or more may be split across windows


def prompt_words(text: str) -> list[str]:
    """The words ComfyUI tokenizes one by one: split on single spaces after newlines become spaces."""
    return [word for word in text.replace("\n", " ").split(" ") if word]


def token_windows(
    word_tokens: Sequence[Sequence[int]],
    *,
    start_token: int,
    end_token: int,
    pad_token: int,
    max_length: int = CLIP_MAX_LENGTH,
    max_word_length: int = MAX_WORD_LENGTH,
) -> list[list[int]]:
    """Windows of exactly ``max_length`` ids from each word's tokens (no word: one empty window)."""
    room = max_length - 2  # tokens between the start and end tokens
    windows: list[list[int]] = []
    current: list[int] = []

    def close() -> None:
        windows.append([start_token, *current, end_token] + [pad_token] * (room - len(current)))
        current.clear()

    for tokens in word_tokens:
        pending = list(tokens)
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
    return windows
