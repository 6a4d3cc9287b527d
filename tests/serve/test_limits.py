"""Work limits: a request over a limit is refused with 422, naming it, before the inpainter works.

The pure checks and the cycle (with fake stages) run in milliseconds; the HTTP checks use the
session's served graph (tests/serve/conftest.py).
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from facedetailer.params import FaceDetailerParams
from serve_app.config import Limits
from serve_app.limits import (
    LimitExceededError,
    check_planned_work,
    check_prompt_tokens,
    check_request,
    face_prompt_tokens,
    face_sampling_steps,
    face_work_units,
)
from serve_app.pipeline import PlannedFace, detail_batch
from tests.serve.test_pipeline import FakeStages, Job, face, textured

LIMITS = Limits(max_steps=50, max_sample_pixels=1024 * 1024, max_faces_per_image=2, max_work_units=100)


def test_work_units_weigh_steps_cycles_and_crop_area():
    params = FaceDetailerParams(steps=20, cycle=2)
    assert face_work_units(params, (512, 512)) == 40
    assert face_work_units(params, (1024, 512)) == 80
    assert face_work_units(params, (256, 256)) == 10


def test_steps_over_the_limit_name_the_limit_and_the_value():
    check_request(FaceDetailerParams(steps=50), LIMITS)
    with pytest.raises(LimitExceededError, match=r"steps: 10000 exceeds limits\.max_steps = 50") as caught:
        check_request(FaceDetailerParams(steps=10000), LIMITS)
    facts = {"limit": "limits.max_steps", "limit_value": 50, "requested": 10000}
    assert caught.value.details() == [{"field": "steps", "message": str(caught.value), **facts}]


@pytest.mark.parametrize(
    ("faces", "params", "limit", "requested"),
    [
        ([PlannedFace(0, 1, (1536, 1024))], {}, "max_sample_pixels", 1536 * 1024),
        ([PlannedFace(0, k, (64, 64)) for k in range(3)], {}, "max_faces_per_image", 3),
        # 2 + 2 faces over two images: each image within 2 faces, the total work over 100 units
        ([PlannedFace(k // 2, k % 2, (512, 512)) for k in range(4)], {"steps": 20, "cycle": 2}, "max_work_units", 160),
    ],
)
def test_planned_work_over_a_limit(faces, params, limit, requested):
    with pytest.raises(LimitExceededError) as caught:
        check_planned_work(FaceDetailerParams(**params), faces, LIMITS)
    assert caught.value.limit == limit and caught.value.requested == requested
    assert f"limits.{limit}" in str(caught.value) and str(getattr(LIMITS, limit)) in str(caught.value)


def test_planned_work_within_limits_passes():
    faces = [PlannedFace(0, 0, (1024, 1024)), PlannedFace(1, 0, (512, 512))]
    check_planned_work(FaceDetailerParams(steps=10), faces, LIMITS)  # 40 + 10 units


def refuse(limit: str):
    def check(faces: list[PlannedFace]) -> None:
        raise LimitExceededError(limit, 0, len(faces), f"{limit}: {[f.sample_size for f in faces]}")

    return check


def test_the_cycle_plans_every_image_before_the_first_inpainter_call():
    """Image 1 is over the limit: image 0's face must not have been refined either."""
    stages = FakeStages([face(40, 40, 80, 90)])
    seen: list[list[PlannedFace]] = []

    def check(faces: list[PlannedFace]) -> None:
        seen.append(faces)
        check_planned_work(FaceDetailerParams(), faces, LIMITS.model_copy(update={"max_faces_per_image": 0}))

    with pytest.raises(LimitExceededError, match="max_faces_per_image"):
        asyncio.run(
            detail_batch([textured(), textured(seed=1)], FaceDetailerParams(), stages, make_job=Job, settings=None,
                         check_work=check)
        )
    assert stages.refine_calls == []
    [faces] = seen
    assert [(f.image_index, f.position) for f in faces] == [(0, 0), (1, 0)]


@pytest.mark.parametrize("hooks", [[], [{"type": "coreml", "mode": "768x512"}]])
def test_planned_sizes_are_the_sizes_the_inpainter_gets(hooks):
    """Including a hook that pins the sampled size (coreml), which the plan must apply too."""
    stages = FakeStages([face(40, 40, 80, 90), face(200, 100, 260, 170)])
    seen: list[PlannedFace] = []
    params = FaceDetailerParams(guide_size=256, max_size=512, detailer_hooks=hooks)
    result = asyncio.run(
        detail_batch([textured()], params, stages, make_job=Job, settings=None, check_work=seen.extend)
    )
    sizes = {(job.image.shape[1], job.image.shape[0]) for job in stages.refine_calls}
    assert {face.sample_size for face in seen} == sizes and len(seen) == 2
    assert [segment.upscaled_size for segment in result.per_image[0].segments] == [f.sample_size for f in seen]
    if hooks:
        assert sizes == {(768, 512)}


def test_a_huge_guide_size_is_refused_before_the_crop_is_upscaled():
    """guide_size = max_size = 16384 on a 40-px face: refused from the plan, no 16k-pixel crop made."""
    stages = FakeStages([face(40, 40, 80, 80)])
    params = FaceDetailerParams(guide_size=16384, max_size=16384)
    with pytest.raises(LimitExceededError, match="max_sample_pixels") as caught:
        asyncio.run(
            detail_batch([textured()], params, stages, make_job=Job, settings=None,
                         check_work=lambda faces: check_planned_work(params, faces, LIMITS))
        )
    assert caught.value.requested > 16000**2 and stages.refine_calls == []


# ------------------------------------------------------------------ what multiplies the work


def unsampler(**values) -> dict:
    return {"type": "unsampler", **values}


@pytest.mark.parametrize(
    ("params", "steps_run"),
    [
        ({"steps": 20, "cycle": 3}, 60),
        # the request: main steps 1, an unsampler of 10000 steps before cycles 1.. (skip_start)
        # runs steps − end_at_step = 10000 − 21 = 9979 steps before cycle 1
        ({"steps": 1, "cycle": 2, "detailer_hooks": [unsampler(steps=10000)]}, 2 + 9979),
        # from_start: before every cycle; end_at_step moves 21 → 24 over the cycles
        ({"steps": 5, "cycle": 2, "detailer_hooks": [unsampler(steps=30, schedule_for_cycle="from_start")]},
         10 + (30 - 21) + (30 - 22)),
        # the denoise schedule reaches 0 in the last cycle: that cycle samples nothing
        ({"steps": 10, "cycle": 3, "denoise": 0.5, "detailer_hooks": [{"type": "denoise_scheduler",
                                                                         "target_denoise": 0.0}]}, 20),
        # noise injection and variation noise draw noise, no UNet step
        ({"steps": 10, "cycle": 2, "detailer_hooks": [{"type": "noise_injection"}, {"type": "variation_noise"}]}, 20),
    ],
)
def test_steps_run_per_face_count_every_cycle_and_unsampler(params, steps_run):
    assert face_sampling_steps(FaceDetailerParams(**params)) == steps_run


def test_retries_and_controlnet_multiply_a_faces_work_units():
    retry = {"type": "black_patch_retry", "mean_thresh": 255, "var_thresh": 255, "max_retries": 10}
    base = FaceDetailerParams(steps=2)
    assert face_work_units(base, (512, 512)) == 2
    assert face_work_units(FaceDetailerParams(steps=2, detailer_hooks=[retry]), (512, 512)) == 20
    control = {"name": "tile", "strength": 1.0}
    assert face_work_units(FaceDetailerParams(steps=2, controlnet=control), (512, 512)) == 3.0
    assert face_work_units(FaceDetailerParams(steps=2, controlnet={**control, "strength": 0.0}), (512, 512)) == 2


def test_an_unsampler_over_max_steps_is_refused_on_arrival_naming_the_hook():
    params = FaceDetailerParams(steps=1, detailer_hooks=[{"type": "noise_injection"}, unsampler(steps=10000)])
    with pytest.raises(LimitExceededError, match="detailer_hooks.1.steps") as caught:
        check_request(params, LIMITS)
    assert [detail["field"] for detail in caught.value.details()] == ["detailer_hooks.1.steps"]
    assert caught.value.requested == 10000


def test_retries_over_the_work_limit_name_the_hooks():
    retry = {"type": "black_patch_retry", "max_retries": 10}
    params = FaceDetailerParams(steps=20, detailer_hooks=[retry])  # 200 units per 512² face
    with pytest.raises(LimitExceededError, match="max_work_units") as caught:
        check_planned_work(params, [PlannedFace(0, 0, (512, 512))], LIMITS)
    assert caught.value.requested == 200
    assert "detailer_hooks" in [detail["field"] for detail in caught.value.details()]


def test_prompt_characters_are_bounded_on_arrival():
    limits = Limits(max_prompt_chars=1000)
    check_request(FaceDetailerParams(positive="x" * 1000), limits)
    for name in ("positive", "negative", "wildcard"):
        with pytest.raises(LimitExceededError, match=f"{name}: 1001 characters") as caught:
            check_request(FaceDetailerParams(**{name: "x" * 1001}), limits)
        assert caught.value.fields == (name,)


def windows_counter():
    from deployments.simulated import SimulatedTokenizer
    from serve_app.prompt_tokens import PromptWindows

    return PromptWindows([(SimulatedTokenizer(), 77)])


def test_prompt_tokens_are_counted_in_whole_windows_as_the_inpainter_cuts_them():
    windows = windows_counter()
    assert windows(()) == windows(("",)) == 1  # the empty prompt: one window, no tokenizer needed
    assert windows(("a photo of a face",)) == 1
    assert windows(("word " * 75,)) == 1 and windows(("word " * 76,)) == 2  # 75 tokens fill a window
    assert windows(("a", "b", "c")) == 3  # every BREAK chunk starts a window
    assert face_prompt_tokens(1, 1) == 75
    assert face_prompt_tokens(2, 3) == 450  # repeated to a common 6 windows, as the UNet sees them
    check_prompt_tokens("positive", 10, LIMITS.model_copy(update={"max_prompt_tokens": 750}))
    with pytest.raises(LimitExceededError, match="positive: 11 windows of 75 CLIP tokens"):
        check_prompt_tokens("positive", 11, LIMITS.model_copy(update={"max_prompt_tokens": 750}))


def test_negative_null_has_no_text_to_count():
    """Impact's Negative Cond Placeholder (``negative: null``): only the positive is counted."""
    check_request(FaceDetailerParams(negative=None), Limits(max_prompt_chars=1000))
    counter = windows_counter()
    limits = LIMITS.model_copy(update={"max_prompt_tokens": 150, "max_work_units": 10_000})
    two_windows = ("word " * 100,)
    check_planned_work(FaceDetailerParams(negative=None), [PlannedFace(0, 0, (64, 64), (), two_windows, None)],
                       limits, counter)  # fmt: skip
    with pytest.raises(LimitExceededError, match="450 tokens"):  # a 3-window negative: lcm(2, 3) = 6 windows
        check_planned_work(FaceDetailerParams(), [PlannedFace(0, 0, (64, 64), (), two_windows, ("w " * 160,))],
                           limits.model_copy(update={"max_prompt_tokens": 300}), counter)  # fmt: skip


def test_each_faces_prompt_after_its_wildcard_is_checked_before_the_inpainter():
    """The wildcard gives one face a long prompt: refused from the plan, nothing refined."""
    stages = FakeStages([face(40, 40, 80, 90), face(200, 100, 260, 170)])
    long_item = "word " * 200  # 3 windows
    params = FaceDetailerParams(wildcard=f"short[SEP]{long_item}", guide_size=128, max_size=256)
    limits = LIMITS.model_copy(update={"max_prompt_tokens": 150, "max_work_units": 10_000})
    with pytest.raises(LimitExceededError, match=r"image 0, face \d: its prompts give the UNet 225 tokens") as caught:
        asyncio.run(
            detail_batch([textured()], params, stages, make_job=Job, settings=None,
                         check_work=lambda faces: check_planned_work(params, faces, limits, windows_counter()))
        )
    assert caught.value.limit == "max_prompt_tokens" and stages.refine_calls == []


# ------------------------------------------------------------------ over HTTP, on the served graph


@pytest.fixture(scope="module")
def client(serve_instance):
    import httpx

    with httpx.Client(base_url=serve_instance["url"], timeout=600, trust_env=False) as http:
        yield http


def post(client, image: np.ndarray, params: dict):
    from tests.serve.test_http import png_bytes

    files = {"image": ("image.png", png_bytes(image), "image/png")}
    return client.post("/v1/detail?format=json", files=files, data={"params": json.dumps(params)})


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_http_refuses_over_limit_requests_with_422_and_lists_limits(client):
    from tests.serve.test_http import three_faces

    info = client.get("/v1/info").json()
    limits = info["limits"]
    for name in ("max_steps", "max_sample_pixels", "max_faces_per_image", "max_work_units"):
        assert name in limits, name
    response = post(client, three_faces(), {"steps": 10000})
    assert response.status_code == 422
    body = response.json()
    assert "limits.max_steps" in body["error"] and "10000" in body["error"]
    # the same list of {"field", "message"} as every other 422, with the limit's facts
    assert body["details"] == [{"field": "steps", "message": body["error"], "limit": "limits.max_steps",
                                "limit_value": limits["max_steps"], "requested": 10000}]  # fmt: skip
    response = post(client, three_faces(), {"steps": 2, "guide_size": 16384, "max_size": 16384})
    assert response.status_code == 422, response.text
    body = response.json()
    assert [detail["field"] for detail in body["details"]] == ["guide_size", "max_size"]
    for detail in body["details"]:
        assert detail["limit"] == "limits.max_sample_pixels" and detail["message"] == body["error"]
        assert detail["requested"] > limits["max_sample_pixels"] == detail["limit_value"]


def test_the_forms_widgets_carry_the_services_limits():
    from facedetailer.widgets import widget_specs
    from serve_app.limits import limited_widgets

    limits = Limits(max_steps=100, max_sample_pixels=1024 * 1024, max_work_units=1600)
    by_name = {spec["name"]: spec for spec in limited_widgets(widget_specs(), limits)}
    assert (by_name["steps"]["max"], by_name["steps"]["node_max"], by_name["steps"]["limit"]) == (
        100, 10000, "limits.max_steps"
    )
    assert "1048576" in by_name["max_size"]["hint"] and "1024" in by_name["max_size"]["hint"]
    assert "limits.max_work_units" in by_name["cycle"]["hint"]
    assert by_name["guide_size"]["max"] == 16384, "not refused by value: a hint, not a bound"
    roomy = {spec["name"]: spec for spec in limited_widgets(widget_specs(), Limits(max_steps=20000))}
    assert roomy["steps"]["max"] == 10000 and "node_max" not in roomy["steps"]
