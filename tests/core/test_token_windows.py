"""ComfyUI 0.3.64's CLIP windows for long prompts (Decision 9).

Vectors worked out by hand from ``SDTokenizer.tokenize_with_weights`` (comfy/sd1_clip.py): a group
(a whole weighted segment) of fewer than 8 tokens that does not fit moves whole to the next window;
a group of 8+ tokens is cut at the window's end, wherever that falls.
"""

from __future__ import annotations

from facedetailer.token_windows import token_windows

START, END, PAD = 49406, 49407, 0


def windows(groups):
    return token_windows(groups, start_token=START, end_token=END, pad_token=PAD)


def test_empty_prompt_is_one_padded_window():
    assert windows([]) == [[START, END] + [PAD] * 75]
    assert windows([[]]) == [[START, END] + [PAD] * 75], "a blank group has no token and changes nothing"


def test_a_short_group_that_does_not_fit_moves_whole_to_the_next_window():
    groups = [[100 + i] * 4 for i in range(19)]  # 18 groups fill 72 of 75 places, the 19th needs 4
    first, second = windows(groups)
    assert len(first) == len(second) == 77
    assert first[1:73] == [t for group in groups[:18] for t in group] and first[73:] == [END, PAD, PAD, PAD]
    assert second[:6] == [START, 118, 118, 118, 118, END]


def test_a_seven_token_group_still_moves_whole():
    first, second = windows([[1] * 70, list(range(200, 207))])  # 70 + 7 > 75, and 7 < 8
    assert first == [START] + [1] * 70 + [END] + [PAD] * 5
    assert second == [START, *range(200, 207), END] + [PAD] * 68


def test_a_group_of_eight_or_more_tokens_is_cut_at_the_window_end():
    groups = [[1] * 72, list(range(200, 210))]  # 72 + a 10-token group: 3 stay, 7 move on
    first, second = windows(groups)
    assert first[73:] == [200, 201, 202, END]
    assert second[:9] == [START, 203, 204, 205, 206, 207, 208, 209, END]
    first, second = windows([[1] * 68, list(range(200, 208))])  # exactly 8 tokens: cut too, 7 | 1
    assert first == [START] + [1] * 68 + list(range(200, 207)) + [END]
    assert second == [START, 207, END] + [PAD] * 74


def test_one_long_plain_group_is_cut_at_exactly_75_tokens_each_time():
    plain = list(range(1000, 1180))  # a 180-token segment, e.g. a plain prompt: 75 + 75 + 30
    first, second, third = windows([plain])
    assert first == [START, *range(1000, 1075), END]
    assert second == [START, *range(1075, 1150), END]
    assert third == [START, *range(1150, 1180), END] + [PAD] * 45


def test_exactly_full_window_adds_no_empty_one():
    assert len(windows([[1] * 75])) == 1
    assert len(windows([[1] * 150])) == 2
    assert len(windows([[1] * 75, [2]])) == 2
