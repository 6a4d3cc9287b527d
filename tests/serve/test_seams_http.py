"""The seam options (color_match, color_match_strength, blend) through the served graph: HTTP and handle.

Same session-wide Ray instance and app as test_http.py; the tiny inpainter's faces are noise, so
the checks are contracts: listed defaults and schema, accepted values, a changed result inside the
crops only, 422 for a bad value.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.testing import assets

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

FAST = {"steps": 2, "guide_size": 128, "max_size": 256}
SEAMLESS = {"color_match": "mean_std", "color_match_strength": 0.8, "blend": "multiband"}


@pytest.fixture(scope="module")
def client(serve_instance):
    with httpx.Client(base_url=serve_instance["url"], timeout=600, trust_env=False) as http:
        yield http


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def outside_crops(shape: tuple[int, ...], crop_regions: list) -> np.ndarray:
    outside = np.ones(shape[:2], bool)
    for x1, y1, x2, y2 in crop_regions:
        outside[y1:y2, x1:x2] = False
    return outside


def lab_mean_error(photo: np.ndarray, image: np.ndarray, segment) -> float:
    """|Lab mean of ``image`` − of ``photo``| over the segment's face box and its ring, with color_match's weights."""
    from skimage import color

    from facedetailer.color_match import statistics_weights

    x1, y1, x2, y2 = segment.crop_region
    bx1, by1, bx2, by2 = (int(v) for v in segment.bbox)
    face = np.zeros((y2 - y1, x2 - x1), np.float32)
    face[by1 - y1 : by2 - y1, bx1 - x1 : bx2 - x1] = 1.0
    weights = statistics_weights(face)[..., None]
    means = [(color.rgb2lab(array[y1:y2, x1:x2] / 255.0) * weights).sum((0, 1)) for array in (photo, image)]
    return float(np.abs(means[0] - means[1]).sum())


def test_info_and_openapi_list_the_seam_options(client):
    defaults = client.get("/v1/info").json()["defaults"]
    assert (defaults["color_match"], defaults["color_match_strength"], defaults["blend"]) == ("none", 1.0, "feather")
    openapi = client.get("/openapi.json").json()
    body = openapi["paths"]["/v1/detail"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"$ref": "#/components/schemas/FaceDetailerParams"} in body["properties"]["params"]["anyOf"]
    params = openapi["components"]["schemas"]["FaceDetailerParams"]["properties"]
    assert params["color_match"]["enum"] == ["none", "mean_std", "histogram"]
    assert params["blend"]["enum"] == ["feather", "multiband"]
    assert (params["color_match_strength"]["minimum"], params["color_match_strength"]["maximum"]) == (0.0, 1.0)
    assert "Lab" in params["color_match"]["description"]


def test_seam_options_over_http_change_the_faces_only(client):
    photo = assets.zidane()
    files = {"image": ("zidane.png", png_bytes(photo), "image/png")}
    plain = client.post("/v1/detail?format=json", files=files, data={"params": json.dumps(FAST)})
    # form fields as strings, the way curl -F sends them
    form = {"params": json.dumps(FAST), **{key: str(value) for key, value in SEAMLESS.items()}}
    seamless = client.post("/v1/detail?format=json", files=files, data=form)
    assert plain.status_code == 200 and seamless.status_code == 200, seamless.text
    body = seamless.json()
    assert {key: body["detailer_pipe"]["params"][key] for key in SEAMLESS} == SEAMLESS
    plain_image, seamless_image = decode(plain.json()["image"]), decode(body["image"])
    outside = outside_crops(photo.shape, [s["crop_region"] for s in body["segments"][0]])
    assert np.array_equal(seamless_image[outside], photo[outside])
    assert not np.array_equal(seamless_image, plain_image)
    assert body["faces_refined"] == 2


@pytest.mark.parametrize(
    ("params", "needle"),
    [({"color_match": "lab"}, "color_match"), ({"blend": "poisson"}, "blend"), ({"color_match_strength": 2}, "1")],
)
def test_bad_seam_options_get_a_422_that_names_the_field(client, params, needle):
    image = base64.b64encode(png_bytes(assets.zidane())).decode()
    response = client.post("/v1/detail", json={"image": image, **params})
    assert response.status_code == 422, response.text
    assert needle in response.json()["error"]


def test_seam_options_through_the_handle_with_two_cycles(serve_instance):
    handle = serve_instance["handle"]
    photo = assets.zidane()
    params = {**FAST, "cycle": 2, "seed": 4}
    plain = handle.detail.remote(photo, params).result(timeout_s=600)
    matched = handle.detail.remote(photo, {**params, "color_match": "histogram"}).result(timeout_s=600)
    regions = [s.crop_region for s in matched.per_image[0].segments]
    assert regions == [s.crop_region for s in plain.per_image[0].segments] and len(regions) == 2
    outside = outside_crops(photo.shape, regions)
    assert np.array_equal(matched.images[0][outside], photo[outside])
    for segment in matched.per_image[0].segments:  # each face: changed, and nearer the photo's colour
        x1, y1, x2, y2 = (int(v) for v in segment.bbox)
        face = np.s_[y1:y2, x1:x2]
        assert not np.array_equal(matched.images[0][face], plain.images[0][face])
        # nearer where the match promises it: the Lab mean over face + ring, weighted as the match
        # weighs them (an RGB mean over the box alone need not move closer for a noise face)
        plain_error = lab_mean_error(photo, plain.images[0], segment)
        matched_error = lab_mean_error(photo, matched.images[0], segment)
        assert matched_error < plain_error, (segment.index, plain_error, matched_error)
    assert len(matched.cropped_refined) == 2
