"""Batched faces with the real models: waves and cross-request batching keep the one-by-one result.

The pipeline runs in-process (LocalStages); the inpainter deployment class is
deployed alone on the session's Ray cluster (``@serve.batch`` needs a real replica: it fails in
``_local_testing_mode`` in this Ray version).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from deployments.detector import FaceDetector
from deployments.inpainter import Inpainter, RefineJob, SamplingSettings
from deployments.serving import InpainterDeployment
from deployments.testing import assets
from facedetailer.params import FaceDetailerParams
from facedetailer.waves import refinement_waves
from serve_app.local import LocalStages

FAST = {"steps": 3, "guide_size": 128, "max_size": 256}


def tiled_faces(count: int, size: int = 192) -> np.ndarray:
    """``count`` astronaut faces side by side: real faces whose crops do not overlap."""
    small = np.asarray(Image.fromarray(assets.astronaut()).resize((size, size), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(np.concatenate([small] * count, axis=1))


@pytest.fixture(scope="module")
def stages(tiny_sd: dict) -> LocalStages:
    return LocalStages(
        detector=FaceDetector(str(assets.faceghost_face_onnx()), task="detect", device="cpu"),
        inpainter=Inpainter(tiny_sd["pipeline"], device="cpu"),
    )


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_non_overlapping_faces_batched_equal_one_by_one_within_float_tolerance(stages):
    image = tiled_faces(3)
    params = FaceDetailerParams(**FAST, bbox_crop_factor=2.0)
    batched = stages.detail([image], params, batch_faces=True)
    single = stages.detail([image], params, batch_faces=False)
    regions = [s.crop_region for s in batched.per_image[0].segments]
    assert len(regions) == 3 and refinement_waves(regions) == [[0, 1, 2]], "one wave: one inpainter call"
    # CPU convolution kernels differ slightly with batch size: at most one uint8 level
    assert max_level_difference(batched.images[0], single.images[0]) <= 1
    assert [s.seed for s in batched.per_image[0].segments] == [s.seed for s in single.per_image[0].segments]


def test_overlapping_faces_keep_the_reference_order(stages):
    image = tiled_faces(3, size=160)
    params = FaceDetailerParams(**FAST, bbox_crop_factor=6.0)
    batched = stages.detail([image], params, batch_faces=True)
    single = stages.detail([image], params, batch_faces=False)
    regions = [s.crop_region for s in batched.per_image[0].segments]
    assert len(refinement_waves(regions)) > 1, "these crops overlap, so they need several waves"
    assert max_level_difference(batched.images[0], single.images[0]) <= 1


def job(size: int, seed: int) -> RefineJob:
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return RefineJob(image=image, noise_mask=None, positive=("a face",), negative=(), seed=seed)


INPAINTER_APP = "inpainter-only"


def inpainter_app(tiny_sd: dict, user_config: dict):
    from ray import serve

    deployment = serve.deployment(InpainterDeployment, name="Inpainter").options(
        ray_actor_options={"num_cpus": 0.1, "num_gpus": 0},
        max_ongoing_requests=16,
        user_config=user_config,
    )
    return deployment.bind(tiny_sd["pipeline"], device="cpu")


@pytest.fixture(scope="module")
def inpainter_handle(serve_instance, tiny_sd: dict):
    """The inpainter deployment alone on the session's Ray cluster (@serve.batch needs a replica)."""
    from ray import serve

    handle = serve.run(
        inpainter_app(tiny_sd, {"max_batch_size": 8, "batch_wait_timeout_s": 0.3}),
        name=INPAINTER_APP,
        route_prefix=None,
    )
    yield handle
    serve.delete(INPAINTER_APP)


def refine_concurrently(handle, requests: list[list[RefineJob]], settings: SamplingSettings) -> list:
    responses = [handle.refine.remote(jobs, settings) for jobs in requests]
    outcomes = []
    for response in responses:
        try:
            outcomes.append(response.result(timeout_s=300))
        except Exception as error:  # noqa: BLE001 - the test inspects which request failed
            outcomes.append(error)
    return outcomes


def test_inpainter_deployment_batches_crops_across_requests_and_reconfigures_live(inpainter_handle):
    settings = SamplingSettings(steps=2)
    requests = [[job(64, 1), job(64, 2)], [job(64, 3)], [job(96, 4)]]
    results = refine_concurrently(inpainter_handle, requests, settings)
    stats = inpainter_handle.batching_stats.remote().result()
    assert stats["recent_model_calls"] == [4], "four crops from three requests in one model call"
    assert [r.shape[:2] for result in results for r in result] == [(64, 64)] * 3 + [(96, 96)]
    [alone] = inpainter_handle.refine.remote([job(64, 3)], settings).result(timeout_s=300)
    assert max_level_difference(alone, results[1][0]) <= 1, "a crop does not depend on its batch"

    # what Serve calls on the running replica when a deployed config changes only user_config
    inpainter_handle.reconfigure.remote({"max_batch_size": 2, "batch_wait_timeout_s": 0.3}).result()
    stats = inpainter_handle.batching_stats.remote().result()
    assert stats["max_batch_size"] == 2 and stats["recent_model_calls"][:2] == [4, 1], "same replica"
    refine_concurrently(inpainter_handle, requests, settings)
    calls = inpainter_handle.batching_stats.remote().result()["recent_model_calls"][2:]
    assert max(calls) <= 2 and sum(calls) == 4, calls


def test_inpainter_deployment_fails_only_the_bad_request(inpainter_handle):
    bad_job = RefineJob(image=np.zeros((8, 8), np.uint8), noise_mask=None, positive=(), negative=(), seed=0)
    ok, failed = refine_concurrently(inpainter_handle, [[job(64, 1)], [bad_job]], SamplingSettings(steps=2))
    assert isinstance(ok, list) and ok[0].shape == (64, 64, 3)
    assert isinstance(failed, Exception)


def test_reconfigure_rejects_unknown_keys(tiny_sd: dict):
    """Checked on the class itself: no replica needed to validate a user_config."""
    deployment = InpainterDeployment.__new__(InpainterDeployment)
    with pytest.raises(ValueError, match="unknown"):
        deployment.reconfigure({"max_batch": 3})
