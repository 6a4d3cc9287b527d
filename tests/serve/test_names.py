"""Request-named files in the service: LoRA tags and wildcard files resolve only inside their folders.

The rule itself is tested in tests/core/test_safe_paths.py; here, every place that uses it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from facedetailer.params import FaceDetailerParams
from facedetailer.safe_paths import UnsafeNameError
from serve_app.limits import check_planned_names
from serve_app.pipeline import detail_batch
from tests.core.test_safe_paths import make_tree
from tests.serve.test_pipeline import FakeStages, Job, face, textured


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path)


def test_lora_names_resolve_only_inside_lora_dir(tree: Path):
    from deployments.inpainter_loading import LoraPatcher

    (tree / "styles" / "face.safetensors").write_bytes(b"x")
    (tree.parent / "outside" / "evil.safetensors").write_bytes(b"x")
    os.symlink(tree.parent / "outside" / "evil.safetensors", tree / "evil.safetensors")
    patcher = LoraPatcher(components=None, lora_dir=tree)  # type: ignore[arg-type]
    assert patcher.find("styles/face") == (tree / "styles" / "face.safetensors").resolve()
    assert patcher.find("face") == (tree / "styles" / "face.safetensors").resolve()  # ComfyUI's suffix match
    assert patcher.find("nothing") is None
    escapes = ("../outside/evil", str(tree.parent / "outside" / "evil"), "evil", "linked/evil", "\u2025/outside/evil")
    for name in escapes:
        with pytest.raises(UnsafeNameError):
            patcher.find(name)


def test_wildcard_folder_reads_only_files_inside(tree: Path):
    import random

    from facedetailer.wildcards import expand_text
    from serve_app.wildcard_files import WildcardFolder

    folder = WildcardFolder(tree)
    assert sorted(folder) == ["alias", "plain", "styles/anime"]
    assert folder["styles/anime"] == ["anime"]
    assert expand_text("__styles/anime__ and __plain__", random.Random(0), folder) == "anime and plain"
    assert expand_text("__escape__", random.Random(0), folder) == "__escape__"  # not a wildcard: stays as written
    with pytest.raises(UnsafeNameError):
        folder["../outside/secret"]
    with pytest.raises(UnsafeNameError):
        folder["escape"]
    with pytest.raises(KeyError):
        folder["missing"]


def test_escaping_lora_tags_refuse_the_request_before_the_inpainter():
    stages = FakeStages([face(40, 40, 80, 90), face(200, 100, 260, 170)])
    params = FaceDetailerParams(wildcard="[ASC] <lora:styles/ok:0.5> face [SEP] <lora:../../etc/passwd:1> face")
    with pytest.raises(UnsafeNameError, match=r"image 0, face 1") as caught:
        asyncio.run(detail_batch([textured()], params, stages, make_job=Job, settings=None,
                                 check_work=check_planned_names))
    assert caught.value.name == "../../etc/passwd" and stages.refine_calls == []


def test_the_inpainter_refuses_a_lora_that_leaves_lora_dir(tree: Path):
    """The full rule where the folder is: a symlink out of lora_dir is refused, a real LoRA is found."""
    from deployments.inpainter import RefineJob, SamplingSettings
    from deployments.model_loading import load_inpainter

    os.symlink(tree.parent / "outside" / "secret.txt", tree / "stolen.safetensors")
    inpainter = load_inpainter("sim://sd15?a=0&b=0", device="cpu", lora_dir=str(tree))
    image = np.full((64, 64, 3), 128, np.uint8)
    settings = SamplingSettings(steps=1, cfg=1.0)
    for name in ("stolen", "../outside/secret", "/etc/passwd"):
        job = RefineJob(image=image, noise_mask=None, positive=("x",), negative=(), seed=0, loras=((name, 1.0, 1.0),))
        with pytest.raises(UnsafeNameError, match="LoRA name"):
            inpainter.refine([job], settings)
    missing = RefineJob(image=image, noise_mask=None, positive=("x",), negative=(), seed=0,
                        loras=(("not-there", 1.0, 1.0),))
    assert inpainter.refine([missing], settings)[0].shape == (64, 64, 3)  # unknown: skipped, as the reference


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_http_refuses_an_escaping_lora_tag_with_422(serve_instance):
    import json

    import httpx

    from tests.serve.test_http import png_bytes, three_faces

    files = {"image": ("image.png", png_bytes(three_faces()), "image/png")}
    params = {"steps": 2, "guide_size": 128, "max_size": 256, "wildcard": "<lora:../../../etc/passwd:1> a face"}
    with httpx.Client(base_url=serve_instance["url"], timeout=300, trust_env=False) as client:
        response = client.post("/v1/detail", files=files, data={"params": json.dumps(params)})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["details"][0]["name"] == "../../../etc/passwd" and "LoRA name" in body["error"]
    assert "field" not in body["details"][0]  # the name came from a prompt or wildcard, not one input
