"""JSON bounds: depth, values and text of what a request carries, refused without recursion or a huge parse."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from facedetailer.json_bounds import (
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    JsonLimitError,
    check_json,
    json_shape,
    loads_bounded,
)
from facedetailer.params import MAX_DETAILER_HOOKS, FaceDetailerParams
from facedetailer.workflow import WorkflowError, import_workflow


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_shape_counts_depth_values_and_text():
    assert json_shape(0) == (0, 1, 0)
    assert json_shape({"ab": ["cd", 1, {"e": None}]}) == (3, 6, 5)  # dict, list, "cd", 1, dict, None; "ab" "cd" "e"
    assert json_shape(json.loads(nested(10))) == (10, 10, 0)


@pytest.mark.parametrize("text", [nested(10_000), nested(100_000)])
def test_deep_nesting_is_a_limit_error_not_a_recursion_error(text):
    for value in (text, text.encode()):
        with pytest.raises(JsonLimitError) as caught:
            loads_bounded(value, "params")
        assert caught.value.field == "params" and caught.value.bound == "max_json_depth"


def test_nesting_below_the_recursion_limit_but_over_the_bound_is_refused_after_parsing():
    with pytest.raises(JsonLimitError, match=f"nested 100 levels deep, over the limit of {MAX_JSON_DEPTH}"):
        loads_bounded(nested(100), "workflow")
    assert loads_bounded(nested(MAX_JSON_DEPTH), "workflow") is not None


def test_millions_of_values_are_refused_before_they_are_built():
    text = "[" + "0," * 2_000_000 + "0]"
    started = time.perf_counter()
    with pytest.raises(JsonLimitError) as caught:
        loads_bounded(text, "body")
    assert caught.value.bound == "max_json_values" and caught.value.requested == 2_000_001
    assert time.perf_counter() - started < 1.0  # counted on the text (no 2M-element list was built)


def test_commas_inside_strings_do_not_count_as_values():
    prompt = "a, " * (MAX_JSON_VALUES + 10)
    value = loads_bounded(json.dumps({"positive": prompt}), "params")
    assert value["positive"] == prompt


def test_text_size_and_bytes_bounds():
    with pytest.raises(JsonLimitError, match="params: 13 bytes of JSON, over the limit of 10"):
        loads_bounded('{"a": "xxxx"}', "params", max_bytes=10)
    with pytest.raises(JsonLimitError, match="3001 characters of text, over the limit of 3000"):
        check_json({"positive": "x" * 2983, "negative": "yy"}, "params", max_characters=3000)


def test_malformed_text_is_a_plain_value_error():
    with pytest.raises(ValueError, match="params: not valid JSON") as caught:
        loads_bounded('{"a": ', "params")
    assert not isinstance(caught.value, JsonLimitError)


def test_hooks_and_controlnet_as_json_text_are_bounded_too():
    with pytest.raises(ValidationError, match="nested deeper than the limit"):
        FaceDetailerParams(detailer_hooks=nested(10_000))
    with pytest.raises(ValidationError, match="nested deeper than the limit"):
        FaceDetailerParams(controlnet=nested(10_000))
    with pytest.raises(ValidationError, match=f"at most {MAX_DETAILER_HOOKS} items"):
        FaceDetailerParams(detailer_hooks=[{"type": "noise_injection"}] * (MAX_DETAILER_HOOKS + 1))


def test_a_deep_workflow_is_a_limit_error_as_text_or_object():
    with pytest.raises(JsonLimitError):
        import_workflow(nested(10_000))
    deep: dict = {}
    inner = deep
    for _ in range(200):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(JsonLimitError, match="workflow: JSON nested 201 levels deep"):
        import_workflow(deep)
    with pytest.raises(WorkflowError, match="workflow: not valid JSON"):
        import_workflow("{")
