"""ControlNet over HTTP and the handle API, on configs/local-cpu.yaml (its tiny "tile" ControlNet)."""

from __future__ import annotations

import numpy as np
import pytest

from deployments.testing import assets
from tests.serve.test_http import FAST, client, decode, post_detail  # noqa: F401 - the client fixture

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

TILE = {"name": "tile", "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}


def test_info_lists_the_configured_controlnets(client):  # noqa: F811
    info = client.get("/v1/info").json()
    assert list(info["controlnets"]) == ["tile"]
    assert info["controlnets"]["tile"]["preprocessor"] == "tile"
    assert info["controlnets"]["tile"]["source"] == "tiny://controlnet/sd15"
    assert info["defaults"]["controlnet"] is None


def test_tile_controlnet_changes_the_face_strength_zero_does_not_and_cnet_images_are_the_crops(client):  # noqa: F811
    photo = assets.astronaut()
    plain = post_detail(client, photo, json_format=True).json()
    tile = post_detail(client, photo, {"controlnet": TILE}, json_format=True).json()
    zero = post_detail(client, photo, {"controlnet": {**TILE, "strength": 0}}, json_format=True).json()
    assert plain["faces_refined"] == tile["faces_refined"] == zero["faces_refined"] == 1
    assert np.array_equal(decode(zero["image"]), decode(plain["image"]))  # strength 0 = no ControlNet
    assert np.abs(decode(tile["image"]).astype(int) - decode(plain["image"])).max() > 10
    # cnet_images: the refined face's control image, for a tile ControlNet the upscaled crop
    [segment] = tile["segments"][0]
    width, height = segment["upscaled_size"]
    [cnet] = tile["cnet_images"]
    assert decode(cnet).shape == (height, width, 3) and decode(cnet).std() > 10
    [placeholder] = plain["cnet_images"]
    assert decode(placeholder).shape == (64, 64, 3) and not decode(placeholder).any()
    assert decode(zero["cnet_images"][0]).shape == (height, width, 3)  # listed even at strength 0


@pytest.mark.parametrize(
    ("controlnet", "needle"),
    [
        ({"name": "canny"}, "controlnet.name: unknown 'canny'; configured: tile"),
        ({"name": "tile", "start_percent": 0.8, "end_percent": 0.2}, "must not exceed end_percent"),
        ({"name": "tile", "end_percent": 1.5}, "end_percent"),
        ({"name": "tile", "strength": -1}, "strength"),
        ({"name": "tile", "weight": 1}, "weight"),
    ],
)
def test_bad_controlnet_requests_are_422_naming_the_field(client, controlnet, needle):  # noqa: F811
    response = post_detail(client, assets.astronaut(), {"controlnet": controlnet})
    assert response.status_code == 422 and needle in response.text, response.text


def test_controlnet_through_the_handle_api(serve_instance):
    from serve_app.ingress import RequestError

    handle = serve_instance["handle"]
    photo = assets.astronaut()
    result = handle.detail.remote(photo, {**FAST, "controlnet": TILE}).result(timeout_s=600)
    [cnet] = result.cnet_images
    [report] = result.per_image[0].segments
    assert cnet.shape == (report.upscaled_size[1], report.upscaled_size[0], 3)
    with pytest.raises(RequestError, match="unknown 'depth'"):
        handle.detail.remote(photo, {**FAST, "controlnet": {"name": "depth"}}).result(timeout_s=60)
