"""A test-session workaround for CPython gh-106905 (fixed in 3.11.8; CI's interpreter is 3.11.7).

Before 3.11.8, ``ast.parse`` keeps its recursion counter in interpreter-wide state, so a parse in
one thread while another thread is converting a tree fails with ``SystemError: AST constructor
recursion depth mismatch``. pytest parses a test's source file to show a failure's traceback while
Ray's and Serve's threads run in the same process; once, that turned one failing fixture into an
INTERNALERROR that ended the whole CI run. Parsing the same source again gives the tree.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Callable
from typing import Any

MISMATCH = "AST constructor recursion depth mismatch"
ATTEMPTS = 5


def retrying_parse(parse: Callable[..., Any]) -> Callable[..., Any]:
    """``parse``, called again (up to ATTEMPTS times in all) when it fails with gh-106905's error."""

    @functools.wraps(parse)
    def parse_again_on_mismatch(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(ATTEMPTS):
            try:
                return parse(*args, **kwargs)
            except SystemError as error:
                if MISMATCH not in str(error) or attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    parse_again_on_mismatch.retries_gh_106905 = True  # type: ignore[attr-defined]
    return parse_again_on_mismatch


def install_ast_parse_retry() -> None:
    """Wrap ``ast.parse`` once, on interpreters that have the bug."""
    if sys.version_info < (3, 11, 8) and not getattr(ast.parse, "retries_gh_106905", False):
        ast.parse = retrying_parse(ast.parse)
