"""Long prompts cut into CLIP windows as ComfyUI 0.3.64 cuts them, on the real CLIP BPE vocabulary.

The tokenizer is built from open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (the vocabulary of
openai/clip-vit-large-patch14); no model weights are needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.inpainter import _prompt_windows
from deployments.testing.tiny_sd import write_clip_tokenizer

BOS, EOS = 49406, 49407
A, FACE = 320, 1710  # "a", "face" in CLIP's vocabulary
PHOTOREALISTIC = [1153, 16157]  # a 2-token word
LONG_WORD = "supercalifragilisticexpialidocious"
LONG_WORD_IDS = [1642, 2857, 13093, 2076, 5868, 26850, 835, 639, 38466]  # 9 tokens: may be cut


def token_ids(tokenizer: object, text: str, length: int) -> list[list[int]]:
    """The windows' ids of :func:`_prompt_windows` (without their weights)."""
    return _prompt_windows(tokenizer, text, length)[0]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp_path_factory.mktemp("clip"))))


def test_the_vocabulary_is_clips(tokenizer) -> None:
    assert tokenizer("a face photorealistic", add_special_tokens=False).input_ids == [A, FACE, *PHOTOREALISTIC]
    assert tokenizer(LONG_WORD, add_special_tokens=False).input_ids == LONG_WORD_IDS


def test_a_plain_prompt_over_75_tokens_is_one_group_cut_at_75_tokens_mid_word(tokenizer) -> None:
    text = " ".join(["a"] * 74 + ["photorealistic", "face"])  # 74 tokens, then a 2-token word: 77 tokens
    first, second = token_ids(tokenizer, text, 77)
    assert first == [BOS] + [A] * 74 + [PHOTOREALISTIC[0], EOS], "ComfyUI 0.3.64 cuts the word's tokens apart"
    assert second == [BOS, PHOTOREALISTIC[1], FACE, EOS] + [EOS] * 73


def test_a_short_weighted_group_that_does_not_fit_moves_whole_with_its_weight(tokenizer) -> None:
    text = " ".join(["a"] * 74) + " (photorealistic face:1.2)"  # a 74-token group, then a 3-token one
    (first, second), (first_weights, second_weights) = _prompt_windows(tokenizer, text, 77)
    assert first == [BOS] + [A] * 74 + [EOS, EOS], "the 75th place stays empty (padded with the end token)"
    assert second == [BOS, *PHOTOREALISTIC, FACE, EOS] + [EOS] * 72
    assert first_weights == [1.0] * 77
    assert second_weights == [1.0, 1.2, 1.2, 1.2] + [1.0] * 73


def test_a_weighted_group_of_eight_or_more_tokens_is_cut_at_the_window_end(tokenizer) -> None:
    text = " ".join(["a"] * 70) + f" ({LONG_WORD}:1.3) a"
    (first, second), (first_weights, second_weights) = _prompt_windows(tokenizer, text, 77)
    assert first == [BOS] + [A] * 70 + LONG_WORD_IDS[:5] + [EOS]
    assert first_weights == [1.0] * 71 + [1.3] * 5 + [1.0]
    assert second == [BOS, *LONG_WORD_IDS[5:], A, EOS] + [EOS] * 70
    assert second_weights == [1.0] + [1.3] * 4 + [1.0] * 72


def test_a_group_is_tokenized_whole_with_its_newlines_and_runs_of_spaces(tokenizer) -> None:
    assert token_ids(tokenizer, "a\nface  a", 77) == [[BOS, A, FACE, A, EOS] + [EOS] * 72]
    assert token_ids(tokenizer, "", 77) == [[BOS, EOS] + [EOS] * 75]
    first, second = token_ids(tokenizer, "a\n" * 40 + "face\n" * 40, 77)  # one 80-token group
    assert first == [BOS] + [A] * 40 + [FACE] * 35 + [EOS]
    assert second == [BOS] + [FACE] * 5 + [EOS] * 71


def test_ids_of_a_whole_group_equal_its_words_ids(tokenizer) -> None:
    """CLIP's tokenizer folds whitespace itself: grouping moves window cuts, never the ids."""
    text = "a photorealistic\n\tface,  smiling's  4k\u00a0photo"
    words = [word for word in text.split() if word]
    per_word = [token for word in words for token in tokenizer(word, add_special_tokens=False).input_ids]
    assert token_ids(tokenizer, text, 77)[0][1 : 1 + len(per_word) + 1] == [*per_word, EOS]


def test_the_ingress_counts_windows_with_a_pickled_tokenizer(tokenizer) -> None:
    """Ray sends the checkpoint's tokenizer to the ingress (limits.max_prompt_tokens): same windows."""
    import pickle

    from deployments.inpainter import count_prompt_windows

    shipped = pickle.loads(pickle.dumps(tokenizer))
    text = " ".join(["a"] * 74 + ["photorealistic", "face"])
    assert count_prompt_windows([(shipped, 77)], [text]) == 2
    assert count_prompt_windows([(shipped, 77)], [text, "a face"]) == 3
    assert count_prompt_windows([(shipped, 77), (tokenizer, 77)], []) == 1
