"""Schemathesis against the app's own OpenAPI schema: no server error, every answer as documented.

Run in-process on the ingress's real FastAPI app with stub model deployments (tests/serve/stub_app.py):
every line between the HTTP request and a model call is the served code — body reading, image
decoding, JSON bounds, parameter validation, limits, the pipeline's planning, error handling —
while the models cost nothing, so a few hundred generated requests take seconds and need no Ray.
(The served graph's own HTTP surface is fuzzed briefly in tests/serve/test_http.py.)

Each operation gets a fixed number of schema-valid and schema-violating requests (derandomized:
the same requests on every run); images come from real files in every mode a client may send
(16-bit, palette, LA, CMYK, EXIF-rotated, WebP) and from broken bytes. A stateful run follows the
schema's link from a workflow import to a detail with the imported parameters. Checks: not a
server error, status code documented, content type and body valid against the schema,
documented headers present, schema-violating data refused.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st
from PIL import Image

schemathesis = pytest.importorskip("schemathesis")

from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.config._checks import NegativeDataRejectionConfig  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serve_app.http_adapters.openapi import VIDEO_MEDIA_TYPES  # noqa: E402
from tests.serve.stub_app import ingress_app  # noqa: E402

EXAMPLES_PER_OPERATION = 75  # per generation mode (schema-valid, schema-violating)
STATEFUL_SCENARIOS = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# A small request fits the stub pipeline in milliseconds; the default limits apply otherwise.
LIMITS = {"max_upload_bytes": 2_000_000, "max_batch_images": 3}


def _encoded(image: Image.Image, format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def image_files() -> list[bytes]:
    """Files in every mode LoadImage handles, and bytes that are not a (whole) image."""
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8))
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    files = [
        _encoded(rgb, "PNG"),
        _encoded(Image.fromarray(ramp), "PNG"),  # 16-bit grey
        _encoded(palette, "PNG", transparency=0),
        _encoded(rgb.convert("LA"), "PNG"),
        _encoded(rgb.convert("CMYK"), "JPEG"),
        _encoded(rgb, "JPEG", exif=exif.tobytes()),  # orientation 6
        _encoded(rgb.convert("RGBA"), "WEBP"),
        _encoded(rgb.resize((8, 8)), "PNG"),  # no face in it
    ]
    return [*files, files[0][:200], b"GIF89a not really", b""]


def video_files() -> list[bytes]:
    """Small clips (H.264 + AAC in mp4 and mkv, no audio, an odd size) and bytes that are not a (whole) video."""
    from deployments.testing.video_clip import ClipSpec, encode_clip

    rng = np.random.default_rng(8)

    def clip(spec: ClipSpec, container: str = "mp4") -> bytes:
        frames = [rng.integers(0, 255, (spec.height, spec.width, 3), dtype=np.uint8) for _ in range(spec.frames)]
        return encode_clip(frames, spec, container)

    mp4 = clip(ClipSpec(frames=3, width=64, height=48))
    files = [
        mp4,
        clip(ClipSpec(frames=2, width=48, height=48, audio=False), "matroska"),
        clip(ClipSpec(frames=2, width=16, height=16, audio=False)),  # no face in it
    ]
    return [*files, mp4[: len(mp4) // 2], image_files()[0], b""]


def empties_a_form_field(case: object) -> bool:
    body = getattr(case, "body", None)
    return case.media_type == "multipart/form-data" and isinstance(body, dict) and any(v == [] for v in body.values())


@pytest.fixture(scope="module")
def schema() -> Iterator[object]:
    files = image_files()
    for media_type in ("image/png", "image/jpeg", "image/webp"):
        schemathesis.openapi.media_type(media_type, st.sampled_from(files))
    videos = video_files()
    for media_type in VIDEO_MEDIA_TYPES:
        schemathesis.openapi.media_type(media_type, st.sampled_from(videos))
    schemathesis.openapi.format("byte", st.sampled_from([base64.b64encode(data).decode() for data in files]))
    try:
        with ingress_app(LIMITS) as (app, _):
            loaded = schemathesis.openapi.from_asgi("/openapi.json", app)
            # schema-violating data is refused as a client error (413 when an image count or size
            # is over a limit before the parameters are read)
            loaded.config.checks.negative_data_rejection = NegativeDataRejectionConfig(
                expected_statuses=[400, 413, 415, 422]
            )
            yield loaded
    finally:
        from schemathesis.specs.openapi.formats import unregister_string_format
        from schemathesis.specs.openapi.media_types import unregister_all

        unregister_all()
        unregister_string_format("byte")


def test_the_schema_documents_every_route_and_its_errors(schema):
    paths = schema.raw_schema["paths"]
    assert set(paths) == {
        "/healthz", "/v1/info", "/v1/stats", "/v1/detail", "/v1/detail/stream", "/v1/workflow/import",
        "/v1/detail/video", "/v1/detail/video/stream",
    }  # fmt: skip
    error = schema.raw_schema["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"error", "status", "request_id"}
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "200" in responses, (path, method)
            if path != "/healthz":
                assert responses["500"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorBody"
                }
    body = paths["/v1/detail"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert {"$ref": "#/components/schemas/FaceDetailerParams"} in body["application/json"]["schema"]["properties"][
        "params"
    ]["anyOf"]
    video = paths["/v1/detail/video"]["post"]
    assert video["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["video"]
    assert set(video["responses"]["200"]["content"]) == {*VIDEO_MEDIA_TYPES, "application/json"}
    hooks = schema.raw_schema["components"]["schemas"]["FaceDetailerParams"]["properties"]["detailer_hooks"]
    assert hooks["maxItems"] == 32


def test_fuzz_every_operation(schema, capsys):
    """Every documented operation, schema-valid and schema-violating requests: no 5xx, all as documented."""
    seen: Counter[tuple[str, int]] = Counter()
    examples = 0
    operations = [result.ok() for result in schema.get_all_operations()]

    def fuzz(operation: object, strategy: object, mode: GenerationMode, count: int) -> None:
        checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS

        @given(case=strategy)
        @settings(
            max_examples=count,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: object) -> None:
            nonlocal examples
            if mode is GenerationMode.NEGATIVE and empties_a_form_field(case):
                reject()  # an empty list sends no form field at all: a valid request, not an invalid one
            response = case.call(headers={"X-Request-ID": f"fuzz-{examples}"})
            examples += 1
            seen[(operation.label, response.status_code)] += 1
            case.validate_response(response, checks=checks)

        run()

    for operation in operations:
        for example in operation.get_strategies_from_examples():  # the schema's documented examples
            fuzz(operation, example, GenerationMode.POSITIVE, 1)
        fuzz(operation, operation.as_strategy(generation_mode=GenerationMode.POSITIVE), GenerationMode.POSITIVE,
             EXAMPLES_PER_OPERATION)  # fmt: skip
        if len(operation.body) or len(operation.query):  # only inputs can be made invalid
            negative = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
            fuzz(operation, negative, GenerationMode.NEGATIVE, EXAMPLES_PER_OPERATION)
    labels = {label for label, _ in seen}
    statuses = Counter()
    for (_, status), count in seen.items():
        statuses[status] += count
    with capsys.disabled():
        print(f"\nschemathesis: {examples} requests over {len(labels)} operations; "
              f"status codes {dict(sorted(statuses.items()))}")
        for label in sorted(labels):
            print(f"  {label}: " + ", ".join(f"{status}×{count}" for (name, status), count in sorted(seen.items())
                                            if name == label))  # fmt: skip
    assert len(labels) == len(operations) == 8
    assert not any(status >= 500 for status in statuses)
    # the generated requests reach the real work, not only the first refusal
    assert seen[("POST /v1/detail", 200)] > 0 and seen[("POST /v1/detail/stream", 200)] > 0
    assert seen[("POST /v1/detail/video", 200)] > 0 and seen[("POST /v1/detail/video/stream", 200)] > 0
    assert seen[("POST /v1/workflow/import", 200)] > 0
    assert seen[("POST /v1/detail", 422)] > 0 and seen[("POST /v1/detail", 415)] > 0


def test_fuzz_stateful_workflow_import_then_detail(schema, capsys):
    """The schema's link: a workflow's imported parameters sent on to /v1/detail, with the same checks."""
    linked: Counter[tuple[str, int]] = Counter()
    calls: Counter[tuple[str, int]] = Counter()

    class Machine(schema.as_state_machine()):
        def step(self, input):  # noqa: A002 - schemathesis' name
            output = super().step(input)
            key = (input.case.operation.label, output.response.status_code)
            calls[key] += 1
            if input.transition is not None and input.is_applied:
                linked[key] += 1
            return output

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs or None)

    Machine.run(
        settings=settings(
            max_examples=STATEFUL_SCENARIOS,
            derandomize=True,
            deadline=None,
            database=None,
            stateful_step_count=4,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
    with capsys.disabled():
        print(f"\nschemathesis stateful: {sum(calls.values())} requests in {STATEFUL_SCENARIOS} scenarios, "
              f"{dict(sorted(calls.items()))}; through the link: {dict(sorted(linked.items()))}")
    assert not any(status >= 500 for _, status in calls)
    assert sum(count for (label, _), count in linked.items() if label == "POST /v1/detail") > 0
