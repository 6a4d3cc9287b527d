"""The ingress's FastAPI app as this process holds it, kept as Serve froze it.

``serve.ingress`` freezes one copy of the app per process, and every ``serve.run`` pickles that
copy to the replicas. In-process tests use the same copy: Serve's local testing mode registers
exception handlers bound to its in-process replica (an event loop that cannot be pickled), and the
in-process HTTP tests build the middleware stack and cache the OpenAPI schema (as generated with
no API keys). Left there, a later ``serve.run`` in the session fails to pickle the app or serves a
stale schema; :func:`kept_as_frozen` gives the copy back as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def frozen_ingress_app() -> Any:
    """The FastAPI app ``FaceDetailerIngress`` replicas are built with (Serve's frozen copy)."""
    from fastapi import FastAPI

    from serve_app.ingress import FaceDetailerIngress

    for cell in FaceDetailerIngress.func_or_class.__init__.__closure__ or ():
        if isinstance(cell.cell_contents, FastAPI):
            return cell.cell_contents
    raise LookupError("Serve's ingress wrapper no longer keeps the app in its __init__ closure")


@contextmanager
def kept_as_frozen() -> Iterator[Any]:
    """The frozen app; on exit its handlers, overrides, middleware stack and schema are restored."""
    app = frozen_ingress_app()
    handlers, overrides = dict(app.exception_handlers), dict(app.dependency_overrides)
    stack, schema = app.middleware_stack, app.openapi_schema
    try:
        yield app
    finally:
        app.exception_handlers.clear()
        app.exception_handlers.update(handlers)
        app.dependency_overrides.clear()
        app.dependency_overrides.update(overrides)
        app.middleware_stack, app.openapi_schema = stack, schema
