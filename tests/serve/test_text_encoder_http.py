"""The shared text encoder deployment in the served graph (configs/local-cpu.yaml's ``text_encoder``).

Flux and SD3 requests are encoded by the TextEncoder deployment, not by the inpainter replica:
its prompt cache counts a miss for a new prompt and a hit when the same prompt comes again, the
counters are in ``GET /v1/stats``, and what it returns equals the checkpoint's own encoders'
output computed in this process, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.testing import assets
from tests.serve.test_http import FAST, client, post_detail  # noqa: F401

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

FLUX = {"model": "flux-dev", "cfg": 1.0, "negative": None, "guidance": 3.5}


def text_stats(client) -> dict:  # noqa: F811
    response = client.get("/v1/stats")
    assert response.status_code == 200, response.text
    return response.json()["text_encoder"]


def test_a_flux_request_is_encoded_by_the_deployment_and_cached(client):  # noqa: F811
    before = text_stats(client)
    params = {**FLUX, "positive": "a test of the shared text encoder, (portrait:1.2)"}
    response = post_detail(client, assets.astronaut(), params, json_format=True)
    assert response.status_code == 200, response.text
    assert response.json()["faces_refined"] == 1
    after = text_stats(client)
    assert after["misses"] == before["misses"] + 1, "a new prompt: one miss (negative: null has no negative)"
    assert after["hits"] == before["hits"]
    [flux] = [entry for entry in after["encoders"].values() if "flux-dev" in entry["checkpoints"]]
    assert flux["family"] == "flux" and flux["encodes"] >= 1
    again = post_detail(client, assets.astronaut(), params, json_format=True)
    assert again.status_code == 200 and again.json()["image"] == response.json()["image"]
    # the inpainter replica keeps its own small cache of conditioning; the deployment's counts are the same or a hit
    last = text_stats(client)
    assert last["misses"] == after["misses"] and last["entries"] >= 1 and last["bytes"] > 0


def test_embeddings_from_the_deployment_equal_local_encoding_exactly(serve_instance, local_cpu_config, client):  # noqa: F811
    from ray import serve

    from deployments.inpainter import Inpainter
    from serve_app.app import app_args_from_config

    spec = app_args_from_config(local_cpu_config).inpainter.checkpoints["flux-dev"].model_dump(exclude_none=True)
    local = Inpainter(**spec, device="cpu", dtype="float32")
    handle = serve.get_deployment_handle("TextEncoder", app_name="facedetailer")
    for chunks in (["a face"], ["(smiling:1.3) face", "BREAK part"], [""]):
        remote = handle.encode.remote("flux-dev", chunks).result(timeout_s=300)
        expected = local.family.encode_prompt(tuple(chunks))
        assert torch.equal(remote.context, expected.context), chunks
        assert torch.equal(remote.pooled, expected.pooled), chunks
    before = text_stats(client)
    first = handle.encode.remote("flux-dev", ["asked twice"]).result(timeout_s=300)
    second = handle.encode.remote("flux-dev", ["asked twice"]).result(timeout_s=300)
    after = text_stats(client)
    assert (after["misses"], after["hits"]) == (before["misses"] + 1, before["hits"] + 1)
    assert torch.equal(first.context, second.context)
    info = serve_instance["handle"].info.remote().result(timeout_s=60)
    loaded = info["models"]["text_encoder"]["loaded"]
    assert any("flux-dev" in entry["checkpoints"] for entry in loaded.values())
    assert np.all([entry["weight_bytes"] > 0 for entry in loaded.values()])
