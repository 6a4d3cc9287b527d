"""Per-request checkpoints over HTTP and the handle API, through the served graph (Ray Serve multiplexing).

configs/local-cpu.yaml serves two tiny SD checkpoints with different random weights ("tiny",
the default, and "tiny-alt"); the second test app (tests/serve/conftest.py) serves a tiny SD 1.x
and a tiny SDXL checkpoint, so the SDXL architecture runs end to end through the graph.
"""

from __future__ import annotations

import numpy as np
import pytest

from deployments.testing import assets
from tests.serve.test_http import FAST, SEGM_ROUTE, client, decode, outside_crop_regions, post_detail  # noqa: F401

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def detail(client, params: dict, route: str = "") -> dict:  # noqa: F811
    response = post_detail(client, assets.astronaut(), params, json_format=True, route=route)
    assert response.status_code == 200, response.text
    return response.json()


def test_info_lists_the_checkpoints_by_name(client):  # noqa: F811
    info = client.get("/v1/info").json()
    names = ["tiny", "tiny-alt", "sdxl-vpred", "sd3", "flux-dev", "flux-fill"]  # one per family: test_families_http
    assert list(info["checkpoints"]) == names and info["checkpoints"]["tiny"]["family"] == "sd"
    inpainter = info["models"]["inpainter"]
    assert list(inpainter["checkpoints"]) == names and inpainter["max_models_per_replica"] == 2
    assert "tiny" in inpainter["loaded_checkpoints"]
    segm = client.get(f"{SEGM_ROUTE}/v1/info").json()["checkpoints"]
    assert list(segm) == ["sd15", "sdxl"] and segm["sdxl"]["family"] == "sdxl"


def test_a_request_names_its_checkpoint_and_the_two_checkpoints_differ(client):  # noqa: F811
    default = detail(client, {})
    tiny = detail(client, {"model": "tiny"})
    alt = detail(client, {"model": "tiny-alt"})
    assert np.array_equal(decode(tiny["image"]), decode(default["image"])), "the first checkpoint is the default"
    difference = np.abs(decode(alt["image"]).astype(int) - decode(tiny["image"]))
    assert difference.max() > 20, "other weights refine the face differently"
    [segments] = alt["segments"]
    assert not difference[outside_crop_regions(difference.shape, segments)].any(), "only the face region changes"
    assert "tiny-alt" in client.get("/v1/info").json()["models"]["inpainter"]["loaded_checkpoints"]
    unknown = post_detail(client, assets.astronaut(), {"model": "sdxl-turbo"})
    assert unknown.status_code == 422 and "model: unknown 'sdxl-turbo'; configured: tiny, tiny-alt, sd" in unknown.text


def test_a_tiny_sdxl_checkpoint_runs_end_to_end_through_the_served_graph(client):  # noqa: F811
    photo = assets.astronaut()
    sd15 = detail(client, {"model": "sd15"}, SEGM_ROUTE)
    sdxl = detail(client, {"model": "sdxl", "positive": "a portrait BREAK sharp"}, SEGM_ROUTE)
    assert sdxl["faces_refined"] == 1
    image = decode(sdxl["image"])
    [segments] = sdxl["segments"]
    outside = outside_crop_regions(image.shape, segments)
    assert np.array_equal(image[outside], photo[outside]) and not np.array_equal(image, photo)
    assert np.abs(image.astype(int) - decode(sd15["image"])).max() > 20
    assert np.isfinite(image).all() and image[~outside].std() > 5
    info = client.get(f"{SEGM_ROUTE}/v1/info").json()["models"]["inpainter"]
    assert "sdxl" in info["loaded_checkpoints"]


def test_checkpoints_through_the_handle_api(serve_instance):
    from serve_app.ingress import RequestError

    handle = serve_instance["handle"]
    photo = assets.astronaut()
    tiny = handle.detail.remote(photo, {**FAST, "model": "tiny"}).result(timeout_s=600)
    alt = handle.detail.remote(photo, {**FAST, "model": "tiny-alt"}).result(timeout_s=600)
    assert not np.array_equal(tiny.images[0], alt.images[0])
    assert alt.detailer_pipe["params"]["model"] == "tiny-alt"
    with pytest.raises(RequestError, match="model: unknown"):
        handle.detail.remote(photo, {**FAST, "model": "nope"}).result(timeout_s=60)
