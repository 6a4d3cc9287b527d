"""Bounds on JSON a request carries: nesting depth, number of values and size, checked without recursion.

Python's ``json`` module and every recursive walk after it fail with ``RecursionError`` on a value
nested a few thousand levels deep, and a megabyte of ``[0,0,0,…]`` becomes hundreds of megabytes
of Python objects. Every JSON a request carries (the body, ``params``, ``workflow``, hooks and
``controlnet`` given as text) goes through these checks, so such input is a clear
:class:`JsonLimitError` (a 422 over HTTP) instead. The walks here are iterative.

No legitimate input comes near the bounds: a FaceDetailer request nests 4 levels, ComfyUI's saved
UI workflows about 8.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_DEPTH = 64  # nesting levels of arrays/objects
MAX_JSON_VALUES = 200_000  # arrays, objects, strings, numbers, booleans and nulls in one document

# A JSON string (with its escapes), for counting the values outside strings at C speed.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_TEXT = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


class JsonLimitError(ValueError):
    """JSON over one of the bounds: ``field`` is the request field, ``bound`` names the bound."""

    def __init__(self, field: str, bound: str, limit_value: int, requested: int | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.bound = bound
        self.limit_value = limit_value
        self.requested = requested

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.field, self.bound, self.limit_value, self.requested, str(self)))


def json_shape(value: Any) -> tuple[int, int, int]:
    """(depth, values, text characters) of a parsed JSON value; depth 0 is a scalar.

    Text characters are the lengths of every string, object keys included: with the number of
    values, a measure of the document's size that needs no re-serialisation.
    """
    depth = values = characters = 0
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, level = pending.pop()
        values += 1
        if isinstance(item, dict):
            depth = max(depth, level + 1)
            for key, child in item.items():
                characters += len(key) if isinstance(key, str) else 0
                pending.append((child, level + 1))
        elif isinstance(item, list | tuple):
            depth = max(depth, level + 1)
            pending.extend((child, level + 1) for child in item)
        elif isinstance(item, str):
            characters += len(item)
    return depth, values, characters


def check_json(
    value: Any,
    field: str,
    *,
    max_depth: int = MAX_JSON_DEPTH,
    max_values: int = MAX_JSON_VALUES,
    max_characters: int | None = None,
) -> None:
    """Refuse a parsed value nested deeper, holding more values or more text than allowed."""
    depth, values, characters = json_shape(value)
    if depth > max_depth:
        raise JsonLimitError(
            field, "max_json_depth", max_depth, depth,
            f"{field}: JSON nested {depth} levels deep, over the limit of {max_depth}",
        )  # fmt: skip
    if values > max_values:
        raise JsonLimitError(
            field, "max_json_values", max_values, values,
            f"{field}: JSON with {values} values, over the limit of {max_values}",
        )  # fmt: skip
    if max_characters is not None and characters > max_characters:
        raise JsonLimitError(
            field, "max_bytes", max_characters, characters,
            f"{field}: JSON with {characters} characters of text, over the limit of {max_characters}",
        )  # fmt: skip


def loads_bounded(
    text: str | bytes,
    field: str,
    *,
    max_bytes: int | None = None,
    max_depth: int = MAX_JSON_DEPTH,
    max_values: int = MAX_JSON_VALUES,
) -> Any:
    """``json.loads`` that refuses, before parsing where it can, what :func:`check_json` refuses.

    Raises :class:`JsonLimitError` for a bound and ``ValueError`` ("not valid JSON: …") for
    malformed text. The values are bounded on the raw text first (arrays, objects and commas
    outside strings), so a document of millions of numbers is never built.
    """
    if max_bytes is not None:
        size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) else len(text)
        if size > max_bytes:
            raise JsonLimitError(
                field, "max_bytes", max_bytes, size, f"{field}: {size} bytes of JSON, over the limit of {max_bytes}"
            )
    at_least = _values_at_least(text, max_values)
    if at_least > max_values:
        raise JsonLimitError(
            field, "max_json_values", max_values, at_least,
            f"{field}: JSON with at least {at_least} values, over the limit of {max_values}",
        )  # fmt: skip
    try:
        value = json.loads(text)
    except RecursionError:
        message = f"{field}: JSON nested deeper than the limit of {max_depth} levels"
        raise JsonLimitError(field, "max_json_depth", max_depth, None, message) from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{field}: not valid JSON: {error}") from None
    check_json(value, field, max_depth=max_depth, max_values=max_values)
    return value


def _values_at_least(text: str | bytes, max_values: int) -> int:
    """A lower bound on the values of a document, from its structure outside strings, at C speed.

    Outside strings every ``,`` starts one more value and every ``[``/``{`` is one, so a
    document holds at least max(commas + 1, containers) values — and at most
    2 × containers + commas + 1, so one within the bound is cheap to parse. The strings are cut
    out only when the whole text's counts (strings included) are not already small.
    """
    if isinstance(text, str):
        outside: str | bytes = text
        containers, commas = text.count("[") + text.count("{"), text.count(",")
        if 2 * containers + commas + 1 > max_values:
            outside = _JSON_TEXT.sub('""', text)
            containers, commas = outside.count("[") + outside.count("{"), outside.count(",")
        return max(commas + 1, containers)
    containers, commas = text.count(b"[") + text.count(b"{"), text.count(b",")
    if 2 * containers + commas + 1 > max_values:
        outside_bytes = _JSON_STRING.sub(b'""', text)
        containers, commas = outside_bytes.count(b"[") + outside_bytes.count(b"{"), outside_bytes.count(b",")
    return max(commas + 1, containers)
