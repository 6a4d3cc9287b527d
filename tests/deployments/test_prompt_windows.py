"""Long prompts cut into CLIP windows as ComfyUI cuts them, on the real CLIP BPE vocabulary.

The tokenizer is built from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (the vocabulary of
openai/clip-vit-large-patch14); no model weights are needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.inpainter import _token_windows
from deployments.testing.tiny_sd import write_clip_tokenizer

BOS, EOS = 49406, 49407
A, FACE = 320, 1710  # "a", "face" in CLIP's vocabulary
PHOTOREALISTIC = [1153, 16157]  # a 2-token word
LONG_WORD = "supercalifragilisticexpialidocious"
LONG_WORD_IDS = [1642, 2857, 13093, 2076, 5868, 26850, 835, 639, 38466]  # 9 tokens: may be split


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp_path_factory.mktemp("clip"))))


def test_the_vocabulary_is_clips(tokenizer) -> None:
    assert tokenizer("a face photorealistic", add_special_tokens=False).input_ids == [A, FACE, *PHOTOREALISTIC]
    assert tokenizer(LONG_WORD, add_special_tokens=False).input_ids == LONG_WORD_IDS


def test_a_word_that_does_not_fit_moves_whole_to_the_next_window(tokenizer) -> None:
    text = " ".join(["a"] * 74 + ["photorealistic", "face"])  # 74 tokens, then a 2-token word
    first, second = _token_windows(tokenizer, text, 77)
    assert first == [BOS] + [A] * 74 + [EOS, EOS], "the 75th place stays empty (padded with the end token)"
    assert second == [BOS, *PHOTOREALISTIC, FACE, EOS] + [EOS] * 72
    # a plain 75-token cut (the old behaviour) would have split the word across the windows
    plain = tokenizer(text, add_special_tokens=False).input_ids
    assert plain[74] == PHOTOREALISTIC[0] and first[75] != plain[74]


def test_a_word_of_eight_or_more_tokens_is_split_at_the_window_end(tokenizer) -> None:
    text = " ".join(["a"] * 70 + [LONG_WORD])
    first, second = _token_windows(tokenizer, text, 77)
    assert first == [BOS] + [A] * 70 + LONG_WORD_IDS[:5] + [EOS]
    assert second[:6] == [BOS, *LONG_WORD_IDS[5:], EOS]


def test_newlines_and_repeated_spaces_separate_words_and_short_prompts_are_one_window(tokenizer) -> None:
    assert _token_windows(tokenizer, "a\nface  a", 77) == [[BOS, A, FACE, A, EOS] + [EOS] * 72]
    assert _token_windows(tokenizer, "", 77) == [[BOS, EOS] + [EOS] * 75]
