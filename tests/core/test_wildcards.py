"""Per-face prompts (spec §7; reference §5.1–5.2, §8, Q6, Q7; Decision 4)."""

import random

import numpy as np
import pytest

from facedetailer.segs import SEG
from facedetailer.wildcards import (
    FacePrompt,
    LoraTag,
    expand_text,
    extract_loras,
    plan_wildcards,
    split_break,
)


def seg(x1, y1, x2, y2, label="face", empty=False):
    mask = np.zeros((4, 4), np.float32) if empty else np.ones((4, 4), np.float32)
    return SEG(crop_region=(0, 0, 4, 4), bbox=(x1, y1, x2, y2), cropped_mask=mask, confidence=0.9, label=label)


# three faces in detection order: x1 = 300, 100, 200; areas 100·100, 50·50, 80·80
THREE = [seg(300, 0, 400, 100), seg(100, 50, 150, 100), seg(200, 10, 280, 90)]


def texts(plan):
    return [p.text for p in plan.prompts]


def plan(wildcard, segs=THREE, seed=0, files=None):
    return plan_wildcards(wildcard, segs, seed=seed, wildcard_files=files)


# --- modes and ordering -----------------------------------------------------------------------


def test_empty_wildcard_uses_the_input_positive_for_every_face():
    result = plan("")
    assert result.order == [0, 1, 2]
    assert result.prompts == [FacePrompt(skip=False, stop=False, seed=None, text=None, concat=False)] * 3


def test_no_prefix_gives_every_face_the_whole_text_unsplit():
    assert texts(plan("smile [SEP] frown")) == ["smile [SEP] frown"] * 3
    assert plan("smile").order == [0, 1, 2]


@pytest.mark.parametrize(
    ("prefix", "order"),
    [("[ASC]", [1, 2, 0]), ("[DSC]", [0, 2, 1]), ("[ASC-SIZE]", [1, 2, 0]), ("[DSC-SIZE]", [0, 2, 1])],
)
def test_ordering_prefixes(prefix, order):
    result = plan(prefix + "a[SEP]b[SEP]c")
    assert result.order == order
    assert texts(result) == ["a", "b", "c"]  # item j goes to position j of the order
    assert result.mode == prefix[1:-1]


def test_size_ordering_differs_from_position_ordering():
    segs = [seg(0, 0, 40, 40), seg(50, 0, 60, 10), seg(20, 0, 40, 20)]  # areas 1600, 100, 400
    assert plan("[ASC]x", segs).order == [0, 2, 1]
    assert plan("[ASC-SIZE]x", segs).order == [1, 2, 0]
    assert plan("[DSC-SIZE]x", segs).order == [0, 2, 1]


def test_asc_breaks_x_ties_by_y():
    segs = [seg(10, 50, 30, 70), seg(10, 5, 30, 25), seg(0, 90, 20, 110)]
    assert plan("[ASC]x", segs).order == [2, 1, 0]
    assert plan("[DSC]x", segs).order == [0, 1, 2]


def test_asc_size_prefix_is_not_read_as_asc():
    assert texts(plan("[ASC-SIZE]a[SEP]b[SEP]c"))[0] == "a"


def test_items_wrap_around_when_there_are_more_faces_than_items():
    faces = [seg(10.0 * k, 0, 10.0 * k + 5, 5) for k in range(5)]
    assert texts(plan("[ASC]a[SEP]b", faces)) == ["a", "b", "a", "b", "a"]


def test_empty_item_means_the_input_positive():
    assert texts(plan("[ASC]a[SEP][SEP]c")) == ["a", None, "c"]


def test_whitespace_only_item_is_an_empty_prompt_as_in_the_reference():
    # only an exactly empty item keeps the input positive; " " encodes the empty prompt
    assert texts(plan("[ASC]a[SEP] [SEP]c")) == ["a", "", "c"]


def test_items_are_stripped_after_expansion():
    assert texts(plan("[ASC] a [SEP]\n b \n[SEP]c")) == ["a", "b", "c"]


def test_explicit_separator_seed():
    result = plan("[ASC]a[SEP:123]b[SEP]c")
    assert [p.seed for p in result.prompts] == [None, 123, None]


def test_explicit_separator_seed_is_reduced_to_a_64_bit_seed():
    assert plan(f"[ASC]a[SEP:{2**64 + 5}]b").prompts[1].seed == 5


def test_explicit_seed_drives_that_faces_choices():
    result = plan("[ASC]x[SEP:123]{a|b|c|d|e|f|g|h}", seed=5)
    assert result.prompts[1].text == expand_text("{a|b|c|d|e|f|g|h}", random.Random(123))


def test_non_integer_separator_value_gives_no_seed():
    assert [p.seed for p in plan("[ASC]a[SEP:abc]b[SEP]c").prompts] == [None, None, None]
    assert texts(plan("[ASC]a[SEP:abc]b[SEP]c")) == ["a", "b", "c"]


def test_random_separator_seed_is_reproducible_and_in_range():
    seeds = [plan("[ASC]a[SEP:R]b", seed=s).prompts[1].seed for s in range(20)]
    assert seeds == [plan("[ASC]a[SEP:R]b", seed=s).prompts[1].seed for s in range(20)]
    assert all(0 <= s <= 2**50 for s in seeds)
    assert len(set(seeds)) > 1


def test_skip_and_stop_match_only_the_whole_item():
    faces = [seg(10.0 * k, 0, 10.0 * k + 5, 5) for k in range(6)]
    result = plan("[ASC]a[SEP] [SKIP] [SEP][SKIP] x[SEP]c[SEP]\n[STOP]\n[SEP]e", faces)
    assert [(p.skip, p.stop) for p in result.prompts] == [
        (False, False),
        (True, False),
        (False, False),
        (False, False),
        (False, True),
        (False, True),  # everything after a [STOP] stops too
    ]
    assert texts(result)[:4] == ["a", None, "[SKIP] x", "c"]


def test_no_prefix_skip_skips_every_face():
    assert all(p.skip for p in plan(" [SKIP] ").prompts)


def test_label_mode_joins_all_and_label_text_without_separator():
    segs = [seg(0, 0, 10, 10, "face"), seg(20, 0, 30, 10, "hand"), seg(40, 0, 50, 10, "person")]
    result = plan("[LAB]\n[ALL] sharp,\n[face] smile\n[hand] five fingers", segs, seed=9)
    assert result.order == [0, 1, 2] and result.mode == "LAB"
    assert texts(result) == ["sharp,smile", "sharp,five fingers", "sharp,"]  # Q7
    assert [p.seed for p in result.prompts] == [None, None, None]


def test_label_mode_without_a_matching_entry_keeps_the_input_positive():
    result = plan("[LAB][face] smile", [seg(0, 0, 10, 10, "face"), seg(20, 0, 30, 10, "hand")])
    assert texts(result) == ["smile", None]


def test_concat_prefix_comes_first():
    result = plan("[CONCAT]smile")
    assert all(p.concat for p in result.prompts) and texts(result) == ["smile"] * 3
    combined = plan("[CONCAT][DSC]a[SEP]b")
    assert combined.order == [0, 2, 1] and texts(combined) == ["a", "b", "a"]
    assert all(p.concat for p in combined.prompts)
    late = plan("[ASC][CONCAT]a")
    assert not any(p.concat for p in late.prompts) and texts(late) == ["[CONCAT]a"] * 3


def test_concat_alone_keeps_the_input_positive():
    assert texts(plan("[CONCAT]")) == [None, None, None]


def test_rnd_is_reproducible_and_hands_out_every_item_before_repeating():
    faces = [seg(10.0 * k, 0, 10.0 * k + 5, 5) for k in range(6)]
    result = plan("[RND]a[SEP]b[SEP]c", faces, seed=3)
    assert result.order == list(range(6))
    assert texts(result) == texts(plan("[RND]a[SEP]b[SEP]c", faces, seed=3))
    assert sorted(texts(result)[:3]) == ["a", "b", "c"] and sorted(texts(result)[3:]) == ["a", "b", "c"]
    assert len({tuple(texts(plan("[RND]a[SEP]b[SEP]c", faces, seed=s))) for s in range(10)}) > 1


def test_empty_mask_segment_uses_a_position_but_no_item():
    segs = [seg(0, 0, 10, 10), seg(20, 0, 30, 10, empty=True), seg(40, 0, 50, 10)]
    result = plan("[ASC]a[SEP]{p|q|r|s|t|u|v|w}", segs, seed=11)
    assert result.prompts[1] == FacePrompt(skip=True, stop=False, seed=None, text=None, concat=False)
    assert result.prompts[0].text == "a"
    # the third face gets item 2 but seed 11 + 2 (its position)
    assert result.prompts[2].text == expand_text("{p|q|r|s|t|u|v|w}", random.Random(13))


def test_each_face_expands_with_seed_plus_position():
    result = plan("{a|b|c|d|e|f|g|h|i|j}", seed=7)
    assert texts(result) == [expand_text("{a|b|c|d|e|f|g|h|i|j}", random.Random(7 + j)) for j in range(3)]


def test_face_seed_wraps_modulo_2_to_the_64():
    result = plan("{a|b|c|d|e|f|g|h|i|j}", seed=2**64 - 1)
    assert result.prompts[1].text == expand_text("{a|b|c|d|e|f|g|h|i|j}", random.Random(0))


def test_loras_are_extracted_per_face():
    result = plan("[ASC]<lora:eyes:0.6> blue eyes[SEP]smile")
    assert result.prompts[0].loras == (LoraTag("eyes", 0.6, 0.6),) and result.prompts[0].text == "blue eyes"
    assert result.prompts[1].loras == ()


# --- text expansion ---------------------------------------------------------------------------


def outcomes(text, files=None, seeds=range(60)):
    return {expand_text(text, random.Random(s), files) for s in seeds}


def test_choice_is_reproducible_by_seed_and_seeds_eventually_differ():
    assert expand_text("{a|b}", random.Random(42)) == expand_text("{a|b}", random.Random(42))
    assert outcomes("{a|b}") == {"a", "b"}


def test_nested_braces():
    assert outcomes("{x {1|2}|y}") == {"x 1", "x 2", "y"}


def test_weights():
    assert outcomes("{5::a|1.5::b}") == {"a", "b"}  # the weight prefix never reaches the text
    assert outcomes("{9::a|0::b|1::c}") == {"a", "c"}
    # "1 ::" weighs 1 but V8 strips only a prefix written without a space before "::"
    assert outcomes("{1 :: a|2::b}") == {"1 :: a", "b"}


def test_weights_summing_to_at_most_one_give_every_option_shuffled():
    # V8's replace_option: total weight <= 1 shuffles and joins all options (a lone option is one)
    assert outcomes("{0::a|1::b}") == {"a b", "b a"}
    assert outcomes("{0.3::a|0.7::b}") == {"a b", "b a"}
    assert outcomes("{a}") == {"a"}


def test_fixed_count_picks_distinct_options():
    for result in outcomes("{2$$a|b|c}"):
        picked = result.split(" ")
        assert len(picked) == 2 and len(set(picked)) == 2 and set(picked) <= {"a", "b", "c"}


def test_range_count_with_custom_separator():
    results = outcomes("{1-2$$ and $$a|b|c}")
    assert {len(r.split(" and ")) for r in results} == {1, 2}
    assert all(set(r.split(" and ")) <= {"a", "b", "c"} for r in results)


def test_open_range_count():
    assert {len(r.split(" ")) for r in outcomes("{-2$$a|b|c}")} == {1, 2}


def test_count_larger_than_the_options_returns_all_of_them():
    assert {frozenset(r.split(" ")) for r in outcomes("{5$$a|b}")} == {frozenset({"a", "b"})}


FILES = {
    "colors": ["red", "green", "# a comment line", "blue"],
    "Outfit": ["__colors__ dress"],
    "people/hair": ["long hair"],
    "people/eyes": ["blue eyes"],
}


def test_wildcard_file_draws_a_line_and_skips_comments():
    assert outcomes("__colors__", FILES) == {"red", "green", "blue"}
    assert outcomes("__COLORS__", FILES) == {"red", "green", "blue"}  # case-insensitive


def test_wildcard_files_nest():
    assert outcomes("__outfit__", FILES) == {"red dress", "green dress", "blue dress"}


def test_wildcard_bare_name_finds_a_file_in_a_folder_and_globs_work():
    assert outcomes("__hair__", FILES) == {"long hair"}
    assert outcomes("__people/*__", FILES) == {"long hair", "blue eyes"}


def test_unknown_wildcard_stays_literal():
    assert expand_text("a __missing__ b", random.Random(0), FILES) == "a __missing__ b"


def test_multi_pick_from_a_wildcard_file():
    for result in outcomes("{2$$, $$__colors__}", FILES):
        picked = result.split(", ")
        assert len(picked) == 2 and len(set(picked)) == 2 and set(picked) <= {"red", "green", "blue"}


def test_quantified_wildcard_gives_independent_draws():
    for result in outcomes("{2$$2#__colors__}", FILES):
        assert len(result.split(" ")) == 2 and set(result.split(" ")) <= {"red", "green", "blue"}


def test_comment_lines_are_removed_and_the_other_line_breaks_kept():
    # Decision 8: only the '#' lines go (the reference also joins the next line onto the previous)
    assert expand_text("a\n# comment\nb\nc", random.Random(0)) == "a\nb\nc"
    assert expand_text("  # first\nx\n#\n#y\nz", random.Random(0)) == "x\nz"


def test_a_wildcard_name_matches_whole_names_only():
    files = {"hair": ["short hair"], "hairstyle": ["braid"], "people/hairstyle": ["bun"], "people/hair": ["long"]}
    assert outcomes("__hair__", files) == {"short hair"}
    assert outcomes("__hai__", files) == {"__hai__"}  # not a prefix of "hair"
    assert outcomes("__*/hair__", files) == {"long"}  # not people/hairstyle
    assert outcomes("__style__", files) == {"__style__"}  # a bare name is */name, not */*name
    assert outcomes("{2$$__hai__}", files) == {"__hai__"}  # unknown stays as written in a group too


def test_glob_draws_uniformly_and_keeps_weight_prefixes():
    files = {"a/x": ["5::heavy"], "a/y": ["light"]}
    assert outcomes("__a/*__", files) == {"5::heavy", "light"}
    assert outcomes("__a/x__", files) == {"heavy"}  # an exact name uses the weights


def test_zero_count_means_any_number_and_too_many_means_all_shuffled():
    assert {len(r.split()) if r else 0 for r in outcomes("{0$$a|b|c}")} == {0, 1, 2, 3}
    assert {frozenset(r.split()) for r in outcomes("{3-9$$a|b}")} == {frozenset({"a", "b"})}
    assert {r.split(",")[0] for r in outcomes("{2$$,$$a|b|c}")} == {"a", "b", "c"}


def test_count_prefix_is_matched_at_the_start_and_extra_dollar_parts_stay_text():
    assert {len(r.split()) for r in outcomes("{2x$$a|b|c}")} == {2}  # V8 reads "2" and drops "x"
    assert all(len(r.split(" ")) == 2 for r in outcomes("{2$$s$$t$$u|v|w}"))
    assert any("2$$s$$t$$u" in r for r in outcomes("{2$$s$$t$$u|v|w}"))


def test_escaped_braces_are_not_options():
    assert expand_text(r"\{a|b\}", random.Random(0)) == r"\{a|b\}"


def test_self_referencing_wildcard_is_bounded():
    with pytest.raises(ValueError, match="wildcard expansion"):
        expand_text("__loop__", random.Random(0), {"loop": ["__loop__ __loop__"]})


# --- LoRA tags and BREAK ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("<lora:x>", LoraTag("x", 1.0, 1.0)),
        ("<lora:x:0.5>", LoraTag("x", 0.5, 0.5)),  # clip defaults to the model weight
        ("<lora:x:.5:0.25>", LoraTag("x", 0.5, 0.25)),
        ("<lora:x:-1>", LoraTag("x", -1.0, -1.0)),
        ("<lora:sub/dir/x.safetensors:1.2:0.3>", LoraTag("sub/dir/x.safetensors", 1.2, 0.3)),
        ("<lora:x:0.8:LBW=MID:1,0,1>", LoraTag("x", 0.8, 0.8)),  # block weights ignored
    ],
)
def test_lora_tag_parsing(text, tag):
    assert extract_loras(text) == ("", (tag,))


def test_lora_tags_are_removed_and_the_first_of_a_name_wins():
    text, tags = extract_loras("a <lora:x:0.5> b <lora:y> <lora:x:0.9>")
    assert text == "a  b  "
    assert tags == (LoraTag("x", 0.5, 0.5), LoraTag("y", 1.0, 1.0))


@pytest.mark.parametrize(
    ("text", "chunks"),
    [("a BREAK b BREAK  ", ["a", "b"]), ("plain", ["plain"]), ("", [""]), ("BREAK", [""])],
)
def test_split_break(text, chunks):
    assert split_break(text) == chunks
