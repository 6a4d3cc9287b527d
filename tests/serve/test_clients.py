"""The streaming endpoint, workflow import over HTTP, the Python client, the CLI's --url and the ComfyUI
node, all against the session's served app (tests/serve/conftest.py).

Real face detector and photos; the tiny random inpainter, so checks are on contracts: faces found,
pixels changed only inside crop regions, seeds, layouts, values carried over from workflows.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.testing import assets
from facedetailer_client import (
    AsyncFaceDetailerClient,
    DetailResult,
    FaceDetailerClient,
    FaceEvent,
    PlanEvent,
    ServiceError,
    StepProgress,
)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

FAST = {"steps": 2, "guide_size": 128, "max_size": 256}
WORKFLOWS = Path(__file__).resolve().parents[1] / "core" / "workflows"
PACK = Path(__file__).resolve().parents[2] / "clients" / "comfyui"


def small_face() -> np.ndarray:
    return np.asarray(Image.fromarray(assets.astronaut()).resize((256, 256), Image.Resampling.LANCZOS))


def no_face(size: int = 256) -> np.ndarray:
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    return np.stack([np.tile(ramp, (size, 1))] * 3, axis=-1).astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def changed_only_inside(before: np.ndarray, after: np.ndarray, regions: list) -> bool:
    changed = np.any(before != after, axis=-1)
    inside = np.zeros(changed.shape, bool)
    for x1, y1, x2, y2 in regions:
        inside[y1:y2, x1:x2] = True
    return bool(changed[inside].any()) and not changed[~inside].any()


@pytest.fixture(scope="module")
def url(serve_instance) -> str:
    return serve_instance["url"]


def test_stream_endpoint_sends_face_events_then_the_json_result(url):
    photo = assets.zidane()  # two faces
    files = {"image": ("zidane.png", png_bytes(photo), "image/png")}
    events = []
    with httpx.Client(timeout=600, trust_env=False) as http:
        data = {"params": json.dumps(FAST), "progress": "false"}  # face events only (steps: test_step_progress_http)
        with http.stream("POST", f"{url}/v1/detail/stream", files=files, data=data) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in answer.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
        assert [name for name, _ in events] == ["face", "face", "result"]
        faces = [data for name, data in events if name == "face"]
        assert sorted(face["seed"] for face in faces) == [0, 1] and {face["status"] for face in faces} == {"refined"}
        result = events[-1][1]
        assert result["faces_refined"] == 2 and {"total", "inpaint"} <= set(result["timings"])
        by_index = sorted(faces, key=lambda face: face["index"])
        assert [s["bbox"] for s in result["segments"][0]] == [face["bbox"] for face in by_index]
        image = np.asarray(Image.open(io.BytesIO(DetailResult.from_json(result).image)).convert("RGB"))
        assert changed_only_inside(photo, image, [s["crop_region"] for s in result["segments"][0]])
        # an input error is a plain JSON 4xx before any stream starts
        refused = http.post(f"{url}/v1/detail/stream", files=files, data={"params": json.dumps({"denoise": 3})})
        assert refused.status_code == 422 and refused.headers["content-type"] == "application/json"
        assert refused.json()["details"][0]["field"] == "denoise"
        # a work limit only known after detection: the stream has started, so it is an `error` event
        over = {**FAST, "guide_size": 16384, "max_size": 16384}
        with http.stream("POST", f"{url}/v1/detail/stream", files=files, data={"params": json.dumps(over)}) as answer:
            assert answer.status_code == 200
            lines = [line for line in answer.iter_lines() if line.startswith(("event: ", "data: "))]
        assert [line for line in lines if line.startswith("event: ")] == ["event: error"]
        error = json.loads(lines[-1][6:])
        assert error["status"] == 422 and "limits.max_sample_pixels" in error["error"]
        assert [detail["field"] for detail in error["details"]] == ["guide_size", "max_size"]


def test_workflow_import_over_http_in_both_formats(url):
    ui = (WORKFLOWS / "facedetailer_ui.json").read_text()
    api = json.loads((WORKFLOWS / "facedetailer_api.json").read_text())
    image = small_face()
    with httpx.Client(base_url=url, timeout=600, trust_env=False) as http:
        supported = http.get("/v1/info").json()
        assert "dpmpp_2m" in supported["samplers"] and "karras" in supported["schedulers"]
        # multipart: the UI-format file as an uploaded file; FAST overrides its sizes and steps
        files = {"image": ("face.png", png_bytes(image), "image/png"), "workflow": ("wf.json", ui, "application/json")}
        multipart = http.post("/v1/detail?format=json", files=files, data={"params": json.dumps(FAST)})
        # JSON body: the API-format workflow as an object
        payload = {"image": base64.b64encode(png_bytes(image)).decode(), "workflow": api, "params": FAST}
        body = http.post("/v1/detail?format=json", json=payload)
        for answer in (multipart, body):
            assert answer.status_code == 200, answer.text
            used = answer.json()["detailer_pipe"]["params"]
            sampling = (used["cfg"], used["sampler_name"], used["scheduler"], used["cycle"])
            assert sampling == (6.5, "dpmpp_2m", "karras", 2)
            assert used["positive"] == "a detailed face, sharp eyes" and used["negative"] == "blurry, lowres"
            assert used["use_sam"] and used["wildcard"].startswith("[ASC]") and used["seed"] == 123456789012345678
            assert used["steps"] == 2 and used["guide_size"] == 128, "explicit values override the workflow"
            assert answer.json()["segments"][0][0]["seed"] == 123456789012345678
        assert multipart.json()["image"] == body.json()["image"], "both formats give the same result"
        two = (WORKFLOWS / "two_facedetailers_ui.json").read_text()
        files = {"image": ("face.png", png_bytes(image), "image/png")}
        ambiguous = http.post("/v1/detail", files=files, data={"workflow": two})
        assert ambiguous.status_code == 422 and ambiguous.json()["details"][0]["field"] == "workflow_node"
        chosen = http.post("/v1/workflow/import", json={"workflow": json.loads(two), "workflow_node": "10"})
        assert chosen.status_code == 200 and chosen.json()["params"]["steps"] == 30
        assert chosen.json()["node_title"] == "Second pass"


def test_python_client_sync_and_async(url):
    photo = small_face()
    with FaceDetailerClient(url) as client:
        result = client.detail(photo, {**FAST, "seed": 5})
        with pytest.raises(ServiceError) as refused:
            client.detail(photo, {"denoise": 3})
        assert client.info()["limits"]["max_batch_images"] == 4
    assert refused.value.status_code == 422 and refused.value.fields == ["denoise"]
    [segment] = result.segments[0]
    assert segment.seed == 5 and not segment.skipped and result.faces_refined == 1
    detailed = result.array(result.image)
    assert detailed.shape == photo.shape
    assert changed_only_inside(photo, detailed, [segment.crop_region])
    assert result.array(result.cropped_enhanced_alpha[0]).shape[2] == 4

    async def streamed() -> list:
        async with AsyncFaceDetailerClient(url) as client:
            return [item async for item in client.stream(photo, {**FAST, "seed": 5}, preview_every=1)]

    items = asyncio.run(streamed())
    assert isinstance(items[0], PlanEvent) and [face.crop_region for face in items[0].faces] == [segment.crop_region]
    steps = [item for item in items if isinstance(item, StepProgress)]
    assert steps and all(item.preview and item.preview[:2] == b"\xff\xd8" for item in steps)  # JPEG previews
    assert steps[-1].done == steps[-1].total == FAST["steps"] and steps[-1].crop_region == segment.crop_region
    assert [type(item) for item in items[-2:]] == [FaceEvent, DetailResult]
    assert items[-2].segment.seed == 5 and items[-2].status == "refined"
    assert items[-1].image == result.image, "same request, same seed: the same image"


def test_cli_detail_url_uses_the_client_and_takes_a_workflow(url, tmp_path):
    from serve_app.cli import main

    source = tmp_path / "face.png"
    source.write_bytes(png_bytes(small_face()))
    out = tmp_path / "out"
    argv = ["detail", str(source), "-o", str(out), "--url", url, "--workflow", str(WORKFLOWS / "facedetailer_api.json")]
    main(argv + [f"--param={key}={value}" for key, value in FAST.items()])
    detailed = np.asarray(Image.open(out / "face.png").convert("RGB"))
    assert detailed.shape == (256, 256, 3) and not np.array_equal(detailed, small_face())
    assert (out / "face.mask.png").exists() and (out / "face.refined-0.png").exists()
    assert not list(out.glob("*.partial*"))
    with pytest.raises(SystemExit, match="denoise"):
        main(["detail", str(source), "-o", str(out), "--url", url, "--param", "denoise=3"])


def load_pack():
    name = "facedetailer_ray_serve_pack_served"
    spec = importlib.util.spec_from_file_location(name, PACK / "__init__.py", submodule_search_locations=[str(PACK)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_comfyui_node_with_torch_tensors(url):
    import torch

    node = load_pack().NODE_CLASS_MAPPINGS["FaceDetailerRayServe"]()
    inputs = node.INPUT_TYPES()
    values = {name: spec[1]["default"] for name, spec in {**inputs["required"], **inputs["optional"]}.items()
              if name not in ("image", "endpoint")}  # fmt: skip
    values.update(FAST, seed=11)
    face, empty = small_face(), no_face()
    # five frames: the service takes 4 per request here, so the node sends two chunks
    frames = [face, empty, empty, empty, face]
    batch = torch.from_numpy(np.stack(frames).astype(np.float32) / 255.0)
    image, cropped_refined, cropped_alpha, mask, cnet_images = node.doit(batch, url, **values)

    assert image.shape == (5, 256, 256, 3) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert mask.shape == (5, 256, 256) and set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    assert mask[0].sum() > 0 and mask[1].sum() == 0
    out = np.round(image.numpy() * 255).astype(np.uint8)
    assert np.array_equal(out[1], empty), "a frame without a face comes back unchanged"
    assert not np.array_equal(out[0], face)
    with FaceDetailerClient(url) as client:  # frame k was detailed with seed + k, across the chunks
        first = client.detail(face, {**FAST, "seed": 11})
        last = client.detail(face, {**FAST, "seed": 15})
    assert np.array_equal(out[0], first.array(first.image)) and np.array_equal(out[4], last.array(last.image))
    assert not np.array_equal(out[0], out[4])
    # the node's lists: each frame's crops, or one black 64x64 placeholder for a frame without any
    placeholder = (1, 64, 64, 3)
    assert [tuple(crop.shape) == placeholder for crop in cropped_refined] == [False, True, True, True, False]
    assert all(crop.ndim == 4 and crop.shape[0] == 1 and crop.shape[3] == 3 for crop in cropped_refined)
    assert [crop.shape[3] for crop in cropped_alpha] == [4, 3, 3, 3, 4]
    assert not any(float(crop.max()) for crop in cropped_refined[1:4])
    assert [tuple(item.shape) for item in cnet_images] == [placeholder] * 5
    with pytest.raises(ServiceError, match="denoise"):
        node.doit(batch[:1], url, **{**values, "denoise": 2.0})


def test_model_names_and_hooks_reach_the_service_from_the_node_and_the_form_definition(url):
    """bbox_detector, segm_detector, sam_model and detailer_hooks: combos of the served names in
    /v1/info's widget definitions; the node's text widgets for them reach the service."""
    segm_url = url + "/segm"  # the second app: bbox detectors "face" and "tiny", a segm detector, no SAM
    with httpx.Client(timeout=60, trust_env=False) as http:
        widgets = {spec["name"]: spec for spec in http.get(f"{segm_url}/v1/info").json()["parameters"]}
        plain = {spec["name"]: spec for spec in http.get(f"{url}/v1/info").json()["parameters"]}
    assert widgets["bbox_detector"]["type"] == "COMBO" and widgets["bbox_detector"]["options"] == ["face", "tiny"]
    assert widgets["segm_detector"]["options"] == ["default"] and widgets["sam_model"]["options"] == []
    assert plain["bbox_detector"]["options"] == ["default"] and plain["detailer_hooks"]["type"] == "JSON"

    import torch

    node = load_pack().NODE_CLASS_MAPPINGS["FaceDetailerRayServe"]()
    inputs = node.INPUT_TYPES()
    values = {name: spec[1]["default"] for name, spec in {**inputs["required"], **inputs["optional"]}.items()
              if name not in ("image", "endpoint")}  # fmt: skip
    values.update(FAST)
    face = small_face()
    batch = torch.from_numpy(face[None].astype(np.float32) / 255.0)
    unchanged = np.round(batch.numpy() * 255).astype(np.uint8)
    # the default bbox detector ("face") would refine the face; "tiny" finds none, so nothing changes
    image, _, _, mask, _ = node.doit(batch, segm_url, **{**values, "bbox_detector": "tiny"})
    assert np.array_equal(np.round(image.numpy() * 255).astype(np.uint8), unchanged) and not mask.any()
    with pytest.raises(ServiceError, match="bbox_detector: unknown 'hand'"):
        node.doit(batch, segm_url, **{**values, "bbox_detector": "hand"})
    # the hooks widget is JSON text: a label filter that keeps no "face" leaves the image as it was
    hooks = json.dumps([{"type": "segs_label_filter", "labels": "hand"}])
    image, _, _, mask, _ = node.doit(batch, url, **{**values, "detailer_hooks": hooks})
    assert np.array_equal(np.round(image.numpy() * 255).astype(np.uint8), unchanged) and not mask.any()
    with pytest.raises(ServiceError, match="detailer_hooks"):
        node.doit(batch, url, **{**values, "detailer_hooks": "[{"})
