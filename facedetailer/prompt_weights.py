"""ComfyUI's prompt emphasis: ``(text)``, ``(text:w)`` and the ``\\(`` ``\\)`` escapes (Decision 9).

ComfyUI's CLIPTextEncode reads a prompt as weighted segments before tokenizing it:

- a parenthesised group multiplies the weight of its text by 1.1, so nesting compounds
  (``((a))`` is 1.1², ``(((a)))`` 1.1³);
- ``(text:w)`` sets the weight of ``text`` to ``w`` — it *replaces* the enclosing weight rather
  than multiplying it, so ``((a:1.5))`` is 1.5. ``w`` is whatever Python's ``float`` reads after
  the group's last colon; when that is not a number (``(a:b)``, ``(:1.5)``), the group is a plain
  ×1.1 group and the colon stays in its text;
- ``\\(`` and ``\\)`` are literal parentheses;
- a ``(`` that is never closed stays in the text literally, as does a stray ``)`` (which also
  shifts the depth count, so later groups of the same run stay literal: ComfyUI's quirk, kept);
- each segment is then tokenized whole, as one group (ComfyUI 0.3.64 cuts it only where
  ``embedding:`` follows a space or a newline, :func:`weighted_groups`); every token of a group
  carries its segment's weight, the window's start, end and padding tokens carry 1.0.

``embedding:NAME`` asks ComfyUI for a textual-inversion embedding (its learned vectors replace
the word; a missing file drops the word). This service has no embeddings to load, so such a
prompt is refused (:class:`PromptSyntaxError`, HTTP 422) rather than encoded differently.
A weight that is not finite in float32 (``nan``, ``inf``, ``1e39``) is refused too: ComfyUI
would turn the conditioning into NaN/inf.
"""

from __future__ import annotations

import math
import re

EMPHASIS = 1.1  # weight factor of a plain parenthesised group
EMBEDDING_PREFIX = "embedding:"
FLOAT32_MAX = 3.4028234663852886e38

# ComfyUI hides escaped parentheses behind these two-character marks while parsing.
_ESCAPED_CLOSE, _ESCAPED_OPEN = "\0\1", "\0\2"
# ComfyUI's marker for an embedding: at the segment's start or after a space or newline.
_EMBEDDING = re.compile(r"(?:^|[ \n])embedding:\s*(\S*)")
# Where ComfyUI cuts a segment into separately tokenized groups.
_EMBEDDING_CUT = re.compile(r"[ \n]embedding:")
# Text CLIP's tokenizer folds to no token: whitespace, except \x1c-\x1f (whitespace to Python, tokens to CLIP).
_NO_TOKEN = re.compile(r"[^\S\x1c-\x1f]*")


class PromptSyntaxError(ValueError):
    """A prompt this service cannot encode the way ComfyUI would (HTTP 422)."""


def _hide_escapes(text: str) -> str:
    return text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)


def _restore_escapes(text: str) -> str:
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")


def top_level_groups(text: str) -> list[str]:
    """``text`` cut into plain runs and outermost ``(…)`` groups, as ComfyUI's depth count cuts it.

    Only a ``(`` met at depth 0 opens a group and only a ``)`` bringing the depth back to 0 closes
    one; a ``)`` at depth 0 makes the depth negative, so characters are then kept in the run.
    """
    pieces: list[str] = []
    piece = ""
    depth = 0
    for char in text:
        if char == "(" and depth == 0:
            if piece:
                pieces.append(piece)
            piece = char
            depth = 1
        elif char == "(":
            piece += char
            depth += 1
        elif char == ")":
            depth -= 1
            piece += char
            if depth == 0:
                pieces.append(piece)
                piece = ""
        else:
            piece += char
    if piece:
        pieces.append(piece)
    return pieces


def _group_weight(body: str, weight: float) -> tuple[str, float]:
    """The text and weight of a group's body: ``text:w`` sets the weight, anything else ×1.1."""
    colon = body.rfind(":")
    if colon > 0:
        try:
            return body[:colon], float(body[colon + 1 :])
        except ValueError:
            pass
    return body, weight * EMPHASIS


def _segments(text: str, weight: float) -> list[tuple[str, float]]:
    segments: list[tuple[str, float]] = []
    for piece in top_level_groups(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            segments += _segments(*_group_weight(piece[1:-1], weight))
        else:
            segments.append((piece, weight))
    return segments


def weighted_segments(text: str) -> list[tuple[str, float]]:
    """The prompt as ComfyUI's (text, weight) segments, in order, escapes resolved."""
    return [(_restore_escapes(segment), weight) for segment, weight in _segments(_hide_escapes(text), 1.0)]


def segment_groups(segment: str) -> list[str]:
    """The pieces ComfyUI tokenizes one by one in a segment: cut before each ``embedding:``.

    The cut consumes the space or newline before ``embedding:``; empty pieces are dropped. Every
    other piece is tokenized whole (newlines and runs of spaces included: CLIP's tokenizer folds
    whitespace itself), so a piece may be cut anywhere at a window's end when it has 8+ tokens.
    """
    pieces = _EMBEDDING_CUT.split(segment)
    return [piece for piece in [pieces[0], *(EMBEDDING_PREFIX + piece for piece in pieces[1:])] if piece]


def weighted_groups(text: str) -> list[tuple[str, float]]:
    """The groups tokenized one by one, each with its segment's weight (groups never cross segments)."""
    return [(group, weight) for segment, weight in weighted_segments(text) for group in segment_groups(segment)]


def embedding_names(text: str) -> list[str]:
    """Textual-inversion names ComfyUI would look up (``embedding:NAME`` starting a segment or a word)."""
    return [name for segment, _ in weighted_segments(text) for name in _EMBEDDING.findall(segment)]


def check_prompt(text: str) -> None:
    """Refuse what we cannot encode as ComfyUI does: embeddings and non-finite weights."""
    names = embedding_names(text)
    if names:
        raise PromptSyntaxError(
            f"textual-inversion embeddings are not supported (embedding:{names[0]}): ComfyUI would put "
            "the embedding's learned vectors in its place; remove it or write the words it stands for"
        )
    for group, weight in weighted_groups(text):
        if not _NO_TOKEN.fullmatch(group) and not (math.isfinite(weight) and abs(weight) <= FLOAT32_MAX):
            raise PromptSyntaxError(f"emphasis weight {weight!r} on {group!r} is not a finite float32 number")
