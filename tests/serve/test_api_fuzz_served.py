"""Schemathesis, briefly, against the served graph (Ray Serve's proxy, real models): answers as documented.

The in-process run (test_api_fuzz.py) fuzzes the request handling in depth; this one checks what
only the served app adds — Serve's proxy and its X-Request-ID, the real deployments behind the
handles — with the documented examples, a few schema-valid requests (the real detector on the
generated images; they hold no face, so the inpainter's work stays with test_http.py) and
schema-violating ones (refused before any model work), per operation, to stay within seconds.
"""

from __future__ import annotations

from collections import Counter

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, reject, settings

from serve_app.http_adapters.openapi import VIDEO_MEDIA_TYPES
from tests.serve.test_api_fuzz import CHECKS, empties_a_form_field, image_files, video_files

schemathesis = pytest.importorskip("schemathesis")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.config._checks import NegativeDataRejectionConfig  # noqa: E402
from schemathesis.specs.openapi.checks import negative_data_rejection  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

POSITIVE_EXAMPLES = 4  # + the documented examples
NEGATIVE_EXAMPLES = 12


@pytest.fixture(scope="module")
def served_schema(serve_instance):
    import base64

    from hypothesis import strategies as st

    files = image_files()
    for media_type in ("image/png", "image/jpeg", "image/webp"):
        schemathesis.openapi.media_type(media_type, st.sampled_from(files))
    videos = video_files()
    for media_type in VIDEO_MEDIA_TYPES:
        schemathesis.openapi.media_type(media_type, st.sampled_from(videos))
    schemathesis.openapi.format("byte", st.sampled_from([base64.b64encode(data).decode() for data in files]))
    session = requests.Session()
    session.trust_env = False
    try:
        loaded = schemathesis.openapi.from_url(f"{serve_instance['url']}/openapi.json", timeout=60)
        loaded.config.checks.negative_data_rejection = NegativeDataRejectionConfig(
            expected_statuses=[400, 413, 415, 422]
        )
        yield loaded, session
    finally:
        from schemathesis.specs.openapi.formats import unregister_string_format
        from schemathesis.specs.openapi.media_types import unregister_all

        unregister_all()
        unregister_string_format("byte")
        session.close()


def test_fuzz_the_served_app(served_schema, capsys):
    schema, session = served_schema
    seen: Counter[tuple[str, int]] = Counter()

    def fuzz(operation: object, strategy: object, mode: GenerationMode, examples: int) -> None:
        checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS

        @given(case=strategy)
        @settings(max_examples=examples, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def run(case: object) -> None:
            if mode is GenerationMode.NEGATIVE and empties_a_form_field(case):
                reject()
            response = case.call(session=session, timeout=300)
            seen[(operation.label, response.status_code)] += 1
            assert response.headers.get("x-request-id"), "Serve's proxy sends the request id"
            case.validate_response(response, checks=checks)

        run()

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for example in operation.get_strategies_from_examples():
            fuzz(operation, example, GenerationMode.POSITIVE, 1)
        positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
        fuzz(operation, positive, GenerationMode.POSITIVE, POSITIVE_EXAMPLES)
        if len(operation.body) or len(operation.query):
            negative = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
            fuzz(operation, negative, GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES)
    with capsys.disabled():
        print(f"\nschemathesis (served): {sum(seen.values())} requests, {dict(sorted(seen.items()))}")
    assert {label for label, _ in seen} == {operation.label for operation in operations}
    assert not any(status >= 500 for _, status in seen)
    assert seen[("POST /v1/detail", 200)] > 0 and seen[("POST /v1/workflow/import", 200)] > 0
