"""ComfyUI's emphasis syntax, vectors worked out by hand from ``comfy/sd1_clip.py``'s algorithm."""

from __future__ import annotations

import pytest

from facedetailer.prompt_weights import (
    PromptSyntaxError,
    check_prompt,
    embedding_names,
    segment_groups,
    top_level_groups,
    weighted_groups,
    weighted_segments,
)
from facedetailer.prompts import face_conditioning
from facedetailer.token_windows import empty_window, token_windows, weighted_token_windows
from facedetailer.wildcards import FacePrompt, split_break

START, END, PAD = 49406, 49407, 0
NO_ITEM = FacePrompt(skip=False, stop=False, seed=None, text=None, concat=False)


def test_a_prompt_without_emphasis_is_one_segment_of_weight_one() -> None:
    assert weighted_segments("a photo of a face, smiling") == [("a photo of a face, smiling", 1.0)]
    assert weighted_groups("a  photo\nof") == [("a  photo\nof", 1.0)], "one group, tokenized whole"


def test_the_briefs_example() -> None:
    assert weighted_segments("a (smiling:1.2) face, ((freckles))") == [
        ("a ", 1.0),
        ("smiling", 1.2),
        (" face, ", 1.0),
        ("freckles", 1.1 * 1.1),  # 1.2100000000000002, as Python multiplies it
    ]


def test_plain_groups_multiply_by_1_1_per_level() -> None:
    assert weighted_segments("(a)") == [("a", 1.1)]
    assert weighted_segments("(((a)))") == [("a", 1.3310000000000004)]  # ((1.1)·1.1)·1.1 in doubles
    assert weighted_segments("((a) b)") == [("a", 1.2100000000000002), (" b", 1.1)]


def test_an_explicit_weight_replaces_the_enclosing_one() -> None:
    assert weighted_segments("((a:1.5))") == [("a", 1.5)]
    assert weighted_segments("(a:0.5)") == [("a", 0.5)]
    # the outer group's last colon is inside "(a:1.5) b": not a number, so the outer is ×1.1
    assert weighted_segments("((a:1.5) b)") == [("a", 1.5), (" b", 1.1)]
    # the outer group's last colon gives 1.5 for all of "a (b:0.5)", whose inner group says 0.5
    assert weighted_segments("(a (b:0.5):1.5)") == [("a ", 1.5), ("b", 0.5)]
    assert weighted_segments("(a:1.2:0.5)") == [("a:1.2", 0.5)]


def test_weights_are_read_by_pythons_float() -> None:
    assert weighted_segments("(a: 1.5 )") == [("a", 1.5)]
    assert weighted_segments("(a:1e-1)") == [("a", 0.1)]
    assert weighted_segments("(a:-1)") == [("a", -1.0)]
    assert weighted_segments("(a:.5)") == [("a", 0.5)]


def test_a_weight_that_is_not_a_number_leaves_a_plain_group() -> None:
    assert weighted_segments("(a:b)") == [("a:b", 1.1)]
    assert weighted_segments("(a:)") == [("a:", 1.1)]
    assert weighted_segments("(:1.5)") == [(":1.5", 1.1)]  # a colon first is not a weight
    assert weighted_segments("x:1.5") == [("x:1.5", 1.0)]  # outside parentheses: plain text


def test_unbalanced_parentheses_stay_literal() -> None:
    assert weighted_segments("(a") == [("(a", 1.0)]
    assert weighted_segments("a)") == [("a)", 1.0)]
    assert weighted_segments("()") == []
    # an unclosed outer group still ends in ")", so it counts as a group of "a (b"
    assert weighted_segments("(a (b)") == [("a ", 1.1), ("(b", 1.1)]
    # a stray ")" makes the depth negative: the next pair only brings it back, so "(b)" stays literal
    assert top_level_groups("a) (b) (c)") == ["a) (b) (c)"]
    assert weighted_segments("a) (b) (c)") == [("a) (b) (c)", 1.0)]
    assert weighted_segments("(a))(b)") == [("a", 1.1), (")(b)", 1.0)]


def test_escaped_parentheses_are_literal_text() -> None:
    assert weighted_segments(r"\(a\) (b)") == [("(a) ", 1.0), ("b", 1.1)]
    assert weighted_segments(r"(\(a\):1.5)") == [("(a)", 1.5)]
    assert weighted_groups(r"\(a\)") == [("(a)", 1.0)]
    # "\\(" is a backslash then an escaped "(": the ")" is then unmatched
    assert weighted_segments(r"\\(a)") == [(r"\(a)", 1.0)]


def test_each_segment_is_one_group_tokenized_whole() -> None:
    # ComfyUI 0.3.64 no longer splits on spaces: newlines and runs of spaces stay in the group
    assert weighted_groups("foo(bar)") == [("foo", 1.0), ("bar", 1.1)]
    assert weighted_groups("(a\nb:1.2) c") == [("a\nb", 1.2), (" c", 1.0)]
    assert weighted_groups("a photo of a face,\n\nsmiling  ") == [("a photo of a face,\n\nsmiling  ", 1.0)]
    assert weighted_groups("( :1.5)") == [(" ", 1.5)]  # no token: the tokenizer folds it away


def test_segments_are_cut_only_before_an_embedding_after_a_space_or_newline() -> None:
    assert segment_groups("a face embedding:foo smiling") == ["a face", "embedding:foo smiling"]
    assert segment_groups("a\nembedding:foo\nembedding:bar b") == ["a", "embedding:foo", "embedding:bar b"]
    assert segment_groups("embedding:foo a") == ["embedding:foo a"]  # at the start: no cut, no empty piece
    assert segment_groups(" embedding:foo") == ["embedding:foo"]  # the space is consumed, "" is dropped
    assert segment_groups("a,embedding:foo\tembedding:bar") == ["a,embedding:foo\tembedding:bar"]
    assert segment_groups("") == []


def test_break_splits_before_emphasis_is_parsed() -> None:
    # Impact splits on BREAK first and encodes each chunk alone: a group cannot span chunks
    assert split_break("(a BREAK b:1.2)") == ["(a", "b:1.2)"]
    assert [weighted_segments(chunk) for chunk in split_break("(a BREAK b:1.2)")] == [
        [("(a", 1.0)],
        [("b:1.2)", 1.0)],
    ]
    assert [weighted_groups(c) for c in split_break("(a:1.5) BREAK ((b))")] == [
        [("a", 1.5)],
        [("b", 1.2100000000000002)],
    ]


def test_embeddings_are_found_where_comfyui_looks_for_them() -> None:
    assert embedding_names("a embedding:foo face") == ["foo"]
    assert embedding_names("embedding:foo") == ["foo"]
    assert embedding_names("(embedding:bar:1.2), x") == ["bar"]
    assert embedding_names("a\nembedding:baz") == ["baz"]
    assert embedding_names("a,embedding:foo") == []  # no space before it: plain text to ComfyUI too
    assert embedding_names("an embedding of a face") == []


def test_what_we_cannot_encode_as_comfyui_is_refused() -> None:
    with pytest.raises(PromptSyntaxError, match="embedding:foo"):
        check_prompt("a face, embedding:foo")
    for text in ("(a:nan)", "(a:inf)", "(a:-inf)", "(a:1e39)"):
        with pytest.raises(PromptSyntaxError, match="not a finite float32"):
            check_prompt(text)
    check_prompt("( :nan)")  # weights no token
    check_prompt("(\n\t\u3000:nan)")  # whitespace CLIP folds away: no token either
    with pytest.raises(PromptSyntaxError, match="not a finite float32"):
        check_prompt("(\x1c:nan)")  # whitespace to Python, but a token to CLIP's tokenizer
    check_prompt("(a:1e38) a,embedding:x (b:-2)")


def test_face_conditioning_refuses_a_chunk_of_the_negative_or_the_face_item() -> None:
    assert face_conditioning("(a:1.2)", "b", NO_ITEM).positive == ("(a:1.2)",)  # text kept; weights at encode
    with pytest.raises(PromptSyntaxError):
        face_conditioning("a", "x BREAK embedding:bad", NO_ITEM)
    item = FacePrompt(skip=False, stop=False, seed=None, text="(c:nan)", concat=True)
    with pytest.raises(ValueError, match="nan"):
        face_conditioning("a", "b", item)


def weighted(groups: list[tuple[list[int], float]]) -> tuple[list[list[int]], list[list[float]]]:
    return weighted_token_windows(groups, start_token=START, end_token=END, pad_token=PAD)


def test_each_token_carries_its_groups_weight_and_special_tokens_carry_one() -> None:
    ids, weights = weighted([([1, 2], 1.2), ([3], 1.0), ([4], 0.5)])
    assert ids == [[START, 1, 2, 3, 4, END] + [PAD] * 71]
    assert weights == [[1.0, 1.2, 1.2, 1.0, 0.5, 1.0] + [1.0] * 71]


def test_a_weighted_group_that_does_not_fit_moves_whole_with_its_weight() -> None:
    ids, weights = weighted([([7] * 74, 0.5), ([8, 9], 1.5)])  # 74 + 2 > 75
    assert ids[0] == [START] + [7] * 74 + [END, PAD]
    assert weights[0] == [1.0] + [0.5] * 74 + [1.0, 1.0]
    assert ids[1][:4] == [START, 8, 9, END] and weights[1][:4] == [1.0, 1.5, 1.5, 1.0]
    assert weights[1][4:] == [1.0] * 73


def test_a_long_weighted_group_split_across_windows_keeps_its_weight_on_both_sides() -> None:
    long_group = list(range(200, 210))  # 10 tokens: 3 stay, 7 move on
    ids, weights = weighted([([1] * 72, 1.0), (long_group, 1.3)])
    assert ids[0][73:] == [200, 201, 202, END] and weights[0][73:] == [1.3, 1.3, 1.3, 1.0]
    assert ids[1][:9] == [START, *range(203, 210), END]
    assert weights[1][:9] == [1.0] + [1.3] * 7 + [1.0]


def test_weighted_windows_cut_exactly_as_the_unweighted_ones() -> None:
    groups = [([100 + i] * (1 + i % 9), 1.0 + i / 10) for i in range(60)]  # ~290 tokens, groups of 1..9
    ids, weights = weighted(groups)
    assert ids == token_windows([tokens for tokens, _ in groups], start_token=START, end_token=END, pad_token=PAD)
    assert len(ids) >= 4 and all(len(row) == 77 for row in weights)
    for window, row in zip(ids, weights, strict=True):  # a token's weight is its group's
        for token, weight in zip(window, row, strict=True):
            expected = 1.0 if token in (START, END, PAD) else 1.0 + (token - 100) / 10
            assert weight == expected


def test_the_empty_window() -> None:
    assert empty_window(start_token=START, end_token=END, pad_token=PAD) == [START, END] + [PAD] * 75
    assert empty_window(start_token=1, end_token=2, pad_token=2, max_length=5) == [1, 2, 2, 2, 2]
