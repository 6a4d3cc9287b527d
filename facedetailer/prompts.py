"""What a face is conditioned on: the request's prompts and the face's wildcard item (Decision 9).

``positive`` and ``negative`` are text here, so they are encoded the way Impact encodes wildcard
text (``process_with_loras``): LoRA tags are removed from the text and their LoRAs applied, the
text is split on ``BREAK`` and the chunks' encodings concatenated (the inpainter windows each
chunk longer than 75 tokens as ComfyUI does). A face's wildcard item replaces the positive, or
is appended to it with ``[CONCAT]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from facedetailer.wildcards import FacePrompt, LoraTag, extract_loras, split_break


@dataclass(frozen=True)
class FaceConditioning:
    """Prompt chunks for the inpainter and the LoRAs to apply while sampling this face."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    loras: tuple[LoraTag, ...]


def face_conditioning(positive: str, negative: str, prompt: FacePrompt) -> FaceConditioning:
    """Chunks and LoRAs for one face.

    LoRAs add up as ComfyUI's LoRA patches do: those of ``positive``, then ``negative``, then the
    face's item (each text keeps its first tag of a name, as the reference parses one text).
    """
    positive_text, positive_loras = extract_loras(positive)
    negative_text, negative_loras = extract_loras(negative)
    base = tuple(split_break(positive_text))
    if prompt.text is None:
        chunks = base
    else:
        face = tuple(split_break(prompt.text))
        chunks = base + face if prompt.concat else face
    return FaceConditioning(
        positive=chunks,
        negative=tuple(split_break(negative_text)),
        loras=positive_loras + negative_loras + prompt.loras,
    )
