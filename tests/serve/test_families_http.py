"""Every model family through the served graph: HTTP and the handle API, one tiny checkpoint each.

configs/local-cpu.yaml serves, besides the tiny SD 1.x ("tiny", "tiny-alt"), an SDXL
v-prediction + zero-terminal-SNR single file ("sdxl-vpred", told so by ComfyUI's marker keys),
an SD3.5-style folder ("sd3"), Flux.1 dev in ComfyUI's split layout ("flux-dev") and Flux.1 Fill
("flux-fill"). Random weights: the checks are that each refines the face region only, the same
way over HTTP and the handle API, that crops of two families in flight at once are each computed
by their own checkpoint's engine (equal to running alone), and what is refused with a 422.
"""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import pytest

from deployments.testing import assets
from tests.serve.test_http import FAST, client, decode, outside_crop_regions, post_detail  # noqa: F401

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

# The request each family is sampled with: Flux at cfg 1 (its way), dev with no negative at all.
FAMILIES = {
    "tiny": {"cfg": 6.0},
    "sdxl-vpred": {"cfg": 5.0},
    "sd3": {"cfg": 4.0, "negative": "blurry"},
    "flux-dev": {"cfg": 1.0, "negative": None, "guidance": 3.5},
    "flux-fill": {"cfg": 1.0, "negative": None, "guidance": 30.0, "inpaint_model": True},
}
EXPECTED = {
    "tiny": ("sd", None, "eps", "discrete", "diffusers"),
    "sdxl-vpred": ("sdxl", None, "v_prediction", "discrete", "single_file"),
    "sd3": ("sd3", None, "const", "discrete_flow", "diffusers"),
    "flux-dev": ("flux", "dev", "const", "flux", "split"),
    "flux-fill": ("flux", "fill", "const", "flux", "diffusers"),
}


@pytest.fixture(scope="module", autouse=True)
def default_checkpoint_loaded_again(serve_instance):
    """The shared app's replica keeps 2 checkpoints: load the default one back for the modules that follow."""
    yield
    handle = serve_instance["handle"]
    handle.detail.remote(assets.astronaut(), {**FAST, "model": "tiny"}).result(timeout_s=600)


def test_info_describes_each_checkpoint_without_server_paths(client, tiny_sd3):  # noqa: F811
    response = client.get("/v1/info")
    checkpoints = response.json()["checkpoints"]
    assert list(checkpoints)[:2] == ["tiny", "tiny-alt"] and set(FAMILIES) <= set(checkpoints)
    for name, (family, variant, prediction, kind, layout) in EXPECTED.items():
        described = checkpoints[name]
        assert (described["family"], described["variant"], described["prediction"]) == (family, variant, prediction)
        assert (described["model_sampling"]["kind"], described["format"]) == (kind, layout), name
        assert described["weight_dtype"] == "float32"
    assert checkpoints["sdxl-vpred"]["model_sampling"]["zsnr"] is True
    assert checkpoints["sd3"]["model_sampling"]["shift"] == 3.0
    assert checkpoints["flux-dev"]["source"]["split"]["clip_l"] == "tiny://flux_dev/split_clip_l"
    assert checkpoints["tiny"]["family"] == "sd" and checkpoints["tiny"]["prediction"] == "eps"
    text = json.dumps(checkpoints)
    assert tiny_sd3["pipeline"] not in text and '"/' not in text, "references as configured, never server paths"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_refines_a_face_over_http_and_the_handle_api(client, serve_instance, name):  # noqa: F811
    photo = assets.astronaut()
    params = {**FAMILIES[name], "model": name}
    response = post_detail(client, photo, params, json_format=True)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["faces_refined"] == 1
    image = decode(body["image"])
    [segments] = body["segments"]
    outside = outside_crop_regions(image.shape, segments)
    assert np.array_equal(image[outside], photo[outside]), "only the face region changes"
    assert np.abs(image[~outside].astype(int) - photo[~outside]).max() > 20, "random weights: the face changes"
    handle = serve_instance["handle"]
    result = handle.detail.remote(photo, {**FAST, **params}).result(timeout_s=600)
    assert np.array_equal(result.images[0], image), "the handle API computes what HTTP does"
    assert result.detailer_pipe["params"]["model"] == name


def _engine_counters(name: str) -> dict:
    from ray import serve

    inpainter = serve.get_deployment_handle("Inpainter", app_name="facedetailer")
    return inpainter.checkpoint_snapshots.remote().result(timeout_s=60).get(name, {})


def test_two_families_in_flight_at_once_each_run_on_their_own_checkpoint(serve_instance):
    handle = serve_instance["handle"]
    photo = assets.astronaut()
    requests = {name: {**FAST, **FAMILIES[name], "model": name, "steps": 3} for name in ("sd3", "flux-dev")}
    alone = {name: handle.detail.remote(photo, params).result(timeout_s=600) for name, params in requests.items()}
    before = {name: _engine_counters(name) for name in requests}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(lambda p: handle.detail.remote(photo, p).result(timeout_s=600), params)
                   for name, params in requests.items()}  # fmt: skip
        together = {name: future.result() for name, future in futures.items()}
    after = {name: _engine_counters(name) for name in requests}
    for name in requests:
        assert np.array_equal(together[name].images[0], alone[name].images[0]), name
        evaluations = after[name]["unet_crop_evaluations"] - before[name]["unet_crop_evaluations"]
        assert evaluations == 3, f"{name}'s engine evaluated its own crop only (3 steps), got {evaluations}"
    assert not np.array_equal(together["sd3"].images[0], together["flux-dev"].images[0])


def test_what_a_family_cannot_honour_is_a_422_naming_what_is_supported(client):  # noqa: F811
    photo = assets.astronaut()
    refusals = [
        ({"model": "flux-dev", "negative": None, "cfg": 3.5}, "set cfg to 1"),
        ({"model": "sd3", "inpaint_model": True}, "Flux: Flux.1 Fill"),
        ({"model": "flux-dev", "cfg": 1.0, "positive": "a face <lora:detail:0.8>"}, "SD 1.x/2.x/XL checkpoints only"),
        ({"model": "flux-dev", "cfg": 1.0, "inpaint_model": True}, "Flux: Flux.1 Fill"),
        ({"model": "sd3", "controlnet": {"name": "tile", "strength": 0.5}}, "controlnet is supported on SD 1.x/2.x/XL"),
        (
            {"model": "flux-dev", "cfg": 1.0, "negative": None, "sampler_name": "euler_cfg_pp"},
            "pick a sampler without cfg_pp",
        ),
    ]
    for params, message in refusals:
        response = post_detail(client, photo, params)
        assert response.status_code == 422 and message in response.text, (params, response.text)
