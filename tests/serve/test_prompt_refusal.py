"""A prompt ComfyUI would encode in a way we cannot is refused before any face reaches the inpainter."""

from __future__ import annotations

import asyncio

import pytest

from facedetailer.params import FaceDetailerParams
from facedetailer.prompt_weights import PromptSyntaxError
from serve_app.pipeline import detail_batch
from tests.serve.test_pipeline import FakeStages, Job, face, textured


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"positive": "a face, embedding:easynegative"}, "embedding:easynegative"),
        ({"negative": "(blurry:nan)"}, "nan"),
        ({"wildcard": "[ASC] (smiling:1.2) face [SEP] a embedding:style"}, "embedding:style"),
    ],
)
def test_refused_prompts_never_reach_the_inpainter(fields: dict, match: str) -> None:
    stages = FakeStages([face(40, 40, 80, 90), face(200, 100, 260, 170)])
    with pytest.raises(PromptSyntaxError, match=match):
        asyncio.run(detail_batch([textured()], FaceDetailerParams(**fields), stages, make_job=Job, settings=None))
    assert stages.refine_calls == []


def test_emphasis_reaches_the_inpainter_as_written() -> None:
    stages = FakeStages([face(40, 40, 80, 90)])
    params = FaceDetailerParams(positive=r"a (smiling:1.2) face, ((freckles)) \(x\) BREAK (eyes)")
    asyncio.run(detail_batch([textured()], params, stages, make_job=Job, settings=None))
    assert [job.positive for job in stages.refine_calls] == [(r"a (smiling:1.2) face, ((freckles)) \(x\)", "(eyes)")]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_http_refuses_an_embedding_with_422(serve_instance) -> None:  # noqa: ANN001
    import json

    import httpx

    from tests.serve.test_http import png_bytes, three_faces

    files = {"image": ("image.png", png_bytes(three_faces()), "image/png")}
    params = {"steps": 2, "guide_size": 128, "max_size": 256, "positive": "(a face:1.2), embedding:easynegative"}
    with httpx.Client(base_url=serve_instance["url"], timeout=300, trust_env=False) as client:
        response = client.post("/v1/detail", files=files, data={"params": json.dumps(params)})
    assert response.status_code == 422, response.text
    assert "textual-inversion" in response.json()["error"] and "embedding:easynegative" in response.json()["error"]
