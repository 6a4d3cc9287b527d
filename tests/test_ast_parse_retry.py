"""The session's ast.parse workaround (tests/ast_parse_retry.py): it retries gh-106905's error only."""

from __future__ import annotations

import ast
import sys

import pytest

from tests.ast_parse_retry import ATTEMPTS, MISMATCH, retrying_parse


def flaky_parse(failures: int, message: str = MISMATCH):
    calls: list[str] = []

    def parse(source: str) -> ast.Module:
        calls.append(source)
        if len(calls) <= failures:
            raise SystemError(f"{message} (before=126, after=73)")
        return ast.parse(source)

    return parse, calls


def test_a_depth_mismatch_is_parsed_again() -> None:
    parse, calls = flaky_parse(failures=2)
    tree = retrying_parse(parse)("x = 1")
    assert ast.unparse(tree) == "x = 1" and calls == ["x = 1"] * 3


def test_a_mismatch_every_time_still_fails_after_the_last_attempt() -> None:
    parse, calls = flaky_parse(failures=ATTEMPTS)
    with pytest.raises(SystemError, match=MISMATCH):
        retrying_parse(parse)("x = 1")
    assert len(calls) == ATTEMPTS


def test_other_errors_are_not_retried() -> None:
    parse, calls = flaky_parse(failures=1, message="something else")
    with pytest.raises(SystemError, match="something else"):
        retrying_parse(parse)("x = 1")
    with pytest.raises(SyntaxError):
        retrying_parse(ast.parse)("x = = 1")
    assert len(calls) == 1


@pytest.mark.skipif(sys.version_info >= (3, 11, 8), reason="the interpreter has CPython's own fix")
def test_the_session_parses_through_the_workaround() -> None:
    assert getattr(ast.parse, "retries_gh_106905", False)
