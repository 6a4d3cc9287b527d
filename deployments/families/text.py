"""Prompt text → encoder outputs as ComfyUI's tokenizers and ``encode_token_weights`` compute them.

Shared by every family. A chunk (one BREAK part) is parsed for emphasis first
(:func:`~facedetailer.prompt_weights.weighted_groups`: each weighted segment one group,
tokenized whole, as ComfyUI 0.3.64 does), then:

- **CLIP** (:func:`prompt_windows`): windows of 77 ids (BOS + up to 75 + EOS, padded); a group
  that does not fit moves whole to the next window unless it has 8+ tokens, then it is cut at
  the window's end (Decision 9);
- **T5** (:func:`t5_tokens`): one sequence without a start token, the groups' ids, EOS, padded
  with id 0 to a minimum length (77 for SD3, 256 for Flux), never cut (ComfyUI's T5XXLTokenizer).

Every encoder then runs the chunk's windows in ONE call and, when any token has a weight ≠ 1,
the empty prompt's window (same length) in that same call, and each weighted token becomes
(z − z_empty)·w + z_empty in float32 (:func:`apply_token_weights`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from facedetailer.prompt_weights import weighted_groups
from facedetailer.token_windows import empty_window, weighted_token_windows

__all__ = [
    "ClipEncoder",
    "T5Encoder",
    "apply_token_weights",
    "prompt_windows",
    "repeat_to_common_length",
    "special_tokens",
    "t5_tokens",
]

T5_PAD = 0  # ComfyUI's T5XXLModel special tokens: end 1, pad 0


def apply_token_weights(hidden: torch.Tensor, empty: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ComfyUI's emphasis: each token with weight w ≠ 1 becomes (z − z_empty)·w + z_empty (float32).

    ``hidden`` [n, L, D] are the windows' hidden states, ``empty`` [L, D] the empty prompt's, and
    ``weights`` [n, L] each place's weight; places of weight 1 are returned bit for bit.
    """
    hidden, empty, weights = hidden.float(), empty.float(), weights.float()
    weighted = (hidden - empty) * weights[..., None] + empty
    return torch.where((weights != 1.0)[..., None], weighted, hidden)


def special_tokens(tokenizer: Any) -> dict[str, int]:
    """Start, end and padding ids (a tokenizer without a pad token pads with its end token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"start_token": tokenizer.bos_token_id, "end_token": tokenizer.eos_token_id, "pad_token": pad}


def _group_tokens(tokenizer: Any, text: str) -> list[tuple[list[int], float]]:
    """(ids, weight) of each weighted group of ``text``, each group tokenized whole without special tokens."""
    groups = weighted_groups(text)
    if not groups:
        return []
    ids = tokenizer(
        [group for group, _ in groups], add_special_tokens=False, truncation=False, verbose=False
    ).input_ids  # one batched call
    return [(tokens, weight) for tokens, (_, weight) in zip(ids, groups, strict=True)]


def prompt_windows(tokenizer: Any, text: str, length: int) -> tuple[list[list[int]], list[list[float]]]:
    """``text`` as ``length``-token CLIP windows cut the way ComfyUI's tokenizer cuts them, and each place's weight."""
    return weighted_token_windows(_group_tokens(tokenizer, text), **special_tokens(tokenizer), max_length=length)


def t5_tokens(tokenizer: Any, text: str, min_length: int) -> tuple[list[int], list[float]]:
    """``text`` as ComfyUI's T5XXLTokenizer gives it: the groups' ids, EOS, 0-padding up to ``min_length``."""
    ids: list[int] = []
    weights: list[float] = []
    for tokens, weight in _group_tokens(tokenizer, text):
        ids += tokens
        weights += [weight] * len(tokens)
    ids.append(int(tokenizer.eos_token_id))
    weights.append(1.0)
    padding = max(0, min_length - len(ids))
    return ids + [T5_PAD] * padding, weights + [1.0] * padding


def repeat_to_common_length(embeds: list[torch.Tensor]) -> torch.Tensor:
    """Bring [1, L_i, D] embeddings to one length by repeating each whole sequence (ComfyUI's way).

    Cross-attention over a sequence repeated k times equals attention over the sequence itself
    (the softmax weights split evenly over the copies), so this changes nothing but the shape,
    unlike padding with an encoded empty prompt. (Not for joint attention, where the text tokens
    attend to each other: the DiT families never mix lengths in a call.)
    """
    target = math.lcm(*(embed.shape[1] for embed in embeds))
    return torch.cat([embed if embed.shape[1] == target else embed.repeat(1, target // embed.shape[1], 1)
                      for embed in embeds])  # fmt: skip


class ClipEncoder:
    """One CLIP text encoder and how a family reads it.

    ``layer``: "last" (the last layer's output, final norm applied: SD 1.x, and SD 2.x whose
    diffusers encoders already end at the penultimate OpenCLIP layer) or "penultimate" (the
    second-to-last layer's output without the final norm: SDXL, SD3). ``pooled``: None, "pooled"
    (the final-normed EOS token: SD3's and Flux's CLIP-L) or "projected" (``text_embeds`` of a
    ``CLIPTextModelWithProjection``: SDXL's and SD3's CLIP-G).
    """

    def __init__(
        self, tokenizer: Any, model: Any, *, layer: str = "last", pooled: str | None = None, device: torch.device
    ) -> None:
        self.tokenizer, self.model, self.layer, self.pooled, self.device = tokenizer, model, layer, pooled, device
        self.length = min(int(tokenizer.model_max_length), int(model.config.max_position_embeddings))

    def encode_chunk(self, chunk: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One chunk's windows [n, L, D] through the encoder in one call (+ its first window's pooled [1, P])."""
        windows, weights = prompt_windows(self.tokenizer, chunk, self.length)
        emphasis = any(weight != 1.0 for row in weights for weight in row)
        if emphasis:
            windows.append(empty_window(**special_tokens(self.tokenizer), max_length=self.length))
        ids = torch.tensor(windows, dtype=torch.long, device=self.device)
        penultimate = self.layer == "penultimate"
        output = self.model(ids, output_hidden_states=penultimate)
        hidden = output.hidden_states[-2] if penultimate else output.last_hidden_state
        if emphasis:
            hidden = apply_token_weights(hidden[:-1], hidden[-1], torch.tensor(weights, device=self.device))
        pooled = None
        if self.pooled == "projected":
            pooled = output.text_embeds[:1]  # the empty window is last
        elif self.pooled == "pooled":  # the final-normed state at the first window's first EOS (CLIP's pooler)
            eos = int((ids[0] == int(self.tokenizer.eos_token_id)).int().argmax())
            pooled = output.last_hidden_state[:1, eos]
        return hidden, pooled


class T5Encoder:
    """A T5 encoder (its last layer, final norm applied) with ComfyUI's T5 tokenization and emphasis."""

    def __init__(self, tokenizer: Any, model: Any, *, min_length: int, device: torch.device) -> None:
        self.tokenizer, self.model, self.min_length, self.device = tokenizer, model, min_length, device

    def encode_chunk(self, chunk: str) -> torch.Tensor:
        """[1, L, D]: the chunk's hidden states (L ≥ ``min_length``)."""
        ids, weights = t5_tokens(self.tokenizer, chunk, self.min_length)
        rows = [ids]
        emphasis = any(weight != 1.0 for weight in weights)
        if emphasis:  # ComfyUI's gen_empty_tokens without a start token: EOS, then padding
            rows.append([int(self.tokenizer.eos_token_id)] + [T5_PAD] * (len(ids) - 1))
        output = self.model(torch.tensor(rows, dtype=torch.long, device=self.device))
        hidden = output.last_hidden_state
        if emphasis:
            hidden = apply_token_weights(hidden[:-1], hidden[-1], torch.tensor([weights], device=self.device))
        return hidden
