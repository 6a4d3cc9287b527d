"""A tiny T5 encoder and a T5 tokenizer built offline, for the SD3 and Flux test models.

The tokenizer is a real Hugging Face ``T5Tokenizer`` (a ``tokenizers`` Unigram model with T5's
Metaspace pre-tokenizer and its ``$A </s>`` template), saved as ``tokenizer.json`` like the
real ``t5-v1_1-xxl`` tokenizer, so ComfyUI's ``T5TokenizerFast`` and ours load the same files.
Its pieces are not trained from text at test time (that would depend on the machine and the
trainer's threads): they are taken, deterministically, from CLIP's BPE vocabulary that
open-clip-torch ships — its most frequent whole words as ``▁word`` pieces and sub-words as
continuation pieces, scored by rank — plus every printable ASCII character, so any ASCII prompt
tokenizes without ``<unk>``. Special ids as T5's: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any

WORD_PIECES = 1500  # whole words (▁word) from CLIP's vocabulary
SUBWORD_PIECES = 500  # continuation pieces
SPACE = "▁"


def t5_vocabulary() -> list[tuple[str, float]]:
    """(piece, log-probability-like score) in id order: specials, characters, words, sub-words."""
    from deployments.testing.assets import clip_bpe_vocab

    with gzip.open(clip_bpe_vocab(), "rt", encoding="utf-8") as handle:
        merges = [line.split() for line in handle.read().split("\n")[1 : 49152 - 256 - 2 + 1]]
    pieces: dict[str, float] = {}
    for code in range(33, 127):  # printable ASCII, alone and word-initial
        pieces.setdefault(chr(code), -12.0)
        pieces.setdefault(SPACE + chr(code), -11.0)
    pieces.setdefault(SPACE, -10.0)
    words = subwords = 0
    for rank, merge in enumerate(merges):
        token = "".join(merge)
        if not token.isascii() or not token.replace("</w>", "").isprintable():
            continue
        score = -1.0 - 8.0 * math.log1p(rank) / math.log1p(len(merges))
        if token.endswith("</w>") and words < WORD_PIECES:
            piece = SPACE + token[: -len("</w>")]
            if piece not in pieces:
                pieces[piece] = score
                words += 1
        elif not token.endswith("</w>") and subwords < SUBWORD_PIECES and token not in pieces:
            pieces[token] = score - 1.0
            subwords += 1
        if words >= WORD_PIECES and subwords >= SUBWORD_PIECES:
            break
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces.items()]


def write_t5_tokenizer(directory: Path) -> Path:
    """Save the tiny T5 tokenizer (``tokenizer.json`` + config) into ``directory``."""
    from transformers import T5Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = T5Tokenizer(vocab=t5_vocabulary(), extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(directory)
    return directory


def t5_config(vocab_size: int, d_model: int) -> Any:
    """T5 v1.1's encoder (gated GELU, relative position buckets) at toy sizes; ``d_model`` = the DiT's text width."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def tiny_t5_encoder(tokenizer_dir: Path, d_model: int) -> Any:
    from transformers import T5EncoderModel, T5Tokenizer

    vocab_size = len(T5Tokenizer.from_pretrained(tokenizer_dir))
    return T5EncoderModel(t5_config(vocab_size, d_model))
