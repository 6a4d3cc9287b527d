"""What a face is conditioned on: the request's prompts and the face's wildcard item (Decision 9).

``positive`` and ``negative`` are text here, so they are encoded the way Impact encodes wildcard
text (``process_with_loras``): LoRA tags are removed from the text and their LoRAs applied, the
text is split on ``BREAK`` and the chunks' encodings concatenated (the inpainter windows each
chunk longer than 75 tokens as ComfyUI does, and weights tokens by ComfyUI's emphasis syntax,
:mod:`facedetailer.prompt_weights`). A face's wildcard item replaces the positive, or is appended
to it with ``[CONCAT]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from facedetailer.prompt_weights import check_prompt
from facedetailer.wildcards import FacePrompt, LoraTag, extract_loras, split_break


@dataclass(frozen=True)
class FaceConditioning:
    """Prompt chunks for the inpainter and the LoRAs to apply while sampling this face."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] | None  # None: no negative conditioning at all (basic guidance)
    loras: tuple[LoraTag, ...]


def face_conditioning(positive: str, negative: str | None, prompt: FacePrompt) -> FaceConditioning:
    """Chunks and LoRAs for one face.

    Raises :class:`~facedetailer.prompt_weights.PromptSyntaxError` for a chunk ComfyUI would
    encode in a way we cannot (an ``embedding:`` name, a non-finite weight).
    LoRAs add up as ComfyUI's LoRA patches do: those of ``positive``, then ``negative``, then the
    face's item (each text keeps its first tag of a name, as the reference parses one text).
    ``negative`` None (Impact's Negative Cond Placeholder) stays None: the inpainter then samples
    with the positive alone.
    """
    positive_text, positive_loras = extract_loras(positive)
    negative_text, negative_loras = extract_loras(negative) if negative is not None else ("", ())
    base = tuple(split_break(positive_text))
    if prompt.text is None:
        chunks = base
    else:
        face = tuple(split_break(prompt.text))
        chunks = base + face if prompt.concat else face
    negative_chunks = tuple(split_break(negative_text)) if negative is not None else None
    for chunk in chunks + (negative_chunks or ()):
        check_prompt(chunk)  # a PromptSyntaxError (422) before the face reaches the inpainter
    return FaceConditioning(
        positive=chunks,
        negative=negative_chunks,
        loras=positive_loras + negative_loras + prompt.loras,
    )
