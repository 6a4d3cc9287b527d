"""ComfyUI's CLIP windows for long prompts (Decision 9): words stay whole unless 8+ tokens long."""

from __future__ import annotations

from facedetailer.token_windows import prompt_words, token_windows

START, END, PAD = 49406, 49407, 0


def windows(words):
    return token_windows(words, start_token=START, end_token=END, pad_token=PAD)


def test_empty_prompt_is_one_padded_window():
    assert windows([]) == [[START, END] + [PAD] * 75]


def test_a_short_word_that_does_not_fit_moves_whole_to_the_next_window():
    words = [[100 + i] * 4 for i in range(19)]  # 18 words fill 72 of 75 places, the 19th needs 4
    first, second = windows(words)
    assert len(first) == len(second) == 77
    assert first[1:73] == [t for word in words[:18] for t in word] and first[73:] == [END, PAD, PAD, PAD]
    assert second[:6] == [START, 118, 118, 118, 118, END]


def test_a_long_word_is_split_at_the_window_end():
    words = [[1] * 72, list(range(200, 210))]  # 72 + a 10-token word: 3 tokens stay, 7 move on
    first, second = windows(words)
    assert first[73:] == [200, 201, 202, END]
    assert second[:9] == [START, 203, 204, 205, 206, 207, 208, 209, END]


def test_exactly_full_window_adds_no_empty_one():
    assert len(windows([[1] * 75])) == 1
    assert len(windows([[1] * 75, [2]])) == 2


def test_prompt_words_split_on_spaces_and_newlines():
    assert prompt_words("a  photo\nof, a face ") == ["a", "photo", "of,", "a", "face"]
