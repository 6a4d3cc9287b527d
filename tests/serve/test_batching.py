"""Batched faces with the real models: waves and the inpainter engine keep the one-by-one result.

The pipeline runs in-process (LocalStages); the inpainter deployment class is deployed alone on
the session's Ray cluster, so its engine runs in a real replica's background thread, its
statistics go through the deployment-scoped stats actor and cancellation through Serve.
"""

from __future__ import annotations

import time

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


def job(size: int, seed: int, settings: SamplingSettings | None = None) -> RefineJob:
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return RefineJob(image=image, noise_mask=None, positive=("a face",), negative=(), seed=seed, settings=settings)


INPAINTER_APP = "inpainter-only"


def inpainter_app(tiny_sd: dict, user_config: dict):
    from ray import serve

    from deployments.engine_stats import deployment_actor_config

    deployment = serve.deployment(InpainterDeployment, name="Inpainter").options(
        ray_actor_options={"num_cpus": 0.1, "num_gpus": 0},
        max_ongoing_requests=16,
        user_config=user_config,
        deployment_actors=[deployment_actor_config()],
    )
    return deployment.bind(tiny_sd["pipeline"], device="cpu")


@pytest.fixture(scope="module")
def inpainter_handle(serve_instance, tiny_sd: dict):
    """The inpainter deployment alone on the session's Ray cluster (its engine runs in a real replica)."""
    from ray import serve

    handle = serve.run(inpainter_app(tiny_sd, {"max_batch_size": 8}), name=INPAINTER_APP, route_prefix=None)
    yield handle
    serve.delete(INPAINTER_APP)


def refine_concurrently(handle, requests: list[list[RefineJob]], settings: SamplingSettings | None) -> list:
    responses = [handle.refine.remote(jobs, settings) for jobs in requests]
    outcomes = []
    for response in responses:
        try:
            outcomes.append(response.result(timeout_s=300))
        except Exception as error:  # noqa: BLE001 - the test inspects which request failed
            outcomes.append(error)
    return outcomes


def stats(handle) -> dict:
    return handle.stats.remote().result(timeout_s=60)


def test_crops_of_concurrent_requests_with_different_settings_share_unet_calls(inpainter_handle):
    before = stats(inpainter_handle)
    requests = [
        [job(64, 1, SamplingSettings(steps=6, sampler_name="euler")), job(64, 2, SamplingSettings(steps=3, cfg=1.0))],
        [job(64, 3, SamplingSettings(steps=5, sampler_name="euler_ancestral", denoise=0.8))],
        [job(64, 4, SamplingSettings(steps=4, sampler_name="heun", scheduler="karras"))],
        [job(96, 5, SamplingSettings(steps=3))],
    ]
    results = refine_concurrently(inpainter_handle, requests, None)
    assert all(not isinstance(result, Exception) for result in results), results
    assert [image.shape[:2] for result in results for image in result.images] == [(64, 64)] * 4 + [(96, 96)]
    after = stats(inpainter_handle)
    assert after["aggregated"] is True, "summed by the deployment's stats actor"
    new_calls = {
        size: count - before["unet_batch_sizes"].get(size, 0)
        for size, count in after["unet_batch_sizes"].items()
        if count > before["unet_batch_sizes"].get(size, 0)
    }
    assert max(new_calls) >= 2, f"crops with different settings shared calls: {new_calls}"
    assert after["crops_completed"] - before["crops_completed"] == 5
    assert all(result.queue_wait_s >= 0 for result in results)
    [alone] = inpainter_handle.refine.remote([requests[1][0]], None).result(timeout_s=300).images
    assert max_level_difference(alone, results[1].images[0]) <= 1, "a crop does not depend on its batch"


def test_reconfigure_is_live_on_the_same_replica(inpainter_handle):
    # what Serve calls on the running replica when a deployed config changes only user_config
    inpainter_handle.reconfigure.remote({"max_batch_size": 1}).result()
    try:
        before = stats(inpainter_handle)
        requests = [[job(64, seed, SamplingSettings(steps=2))] for seed in range(3)]
        refine_concurrently(inpainter_handle, requests, None)
        after = stats(inpainter_handle)
        assert set(after["unet_batch_sizes"]) - set(before["unet_batch_sizes"]) <= {1}
        assert after["unet_batch_sizes"][1] - before["unet_batch_sizes"].get(1, 0) == 6
        info = inpainter_handle.info.remote().result()
        assert info["engine"]["max_batch_size"] == 1
    finally:
        inpainter_handle.reconfigure.remote({"max_batch_size": 8}).result()


def test_inpainter_deployment_fails_only_the_bad_request(inpainter_handle):
    bad_job = RefineJob(image=np.zeros((8, 8), np.uint8), noise_mask=None, positive=(), negative=(), seed=0)
    bad_sampler = job(64, 9, SamplingSettings(sampler_name="no_such_sampler"))
    ok, failed, refused = refine_concurrently(
        inpainter_handle, [[job(64, 1)], [bad_job], [bad_sampler]], SamplingSettings(steps=2)
    )
    assert ok.images[0].shape == (64, 64, 3)
    assert isinstance(failed, ValueError) and "uint8 [H, W, 3]" in str(failed)
    assert isinstance(refused, ValueError) and "no_such_sampler" in str(refused)


def test_a_cancelled_call_leaves_the_engine_within_a_step(inpainter_handle):
    """Cancelling the handle call (what the ingress does when its client goes) stops the crop's sampling."""
    before = stats(inpainter_handle)
    long = inpainter_handle.refine.remote([job(96, 7, SamplingSettings(steps=2000))], None)
    deadline = time.monotonic() + 60
    while stats(inpainter_handle)["active_crops"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    long.cancel()
    while stats(inpainter_handle)["active_crops"] and time.monotonic() < deadline:
        time.sleep(0.2)
    after = stats(inpainter_handle)
    assert after["active_crops"] == 0 and after["crops_cancelled"] == before["crops_cancelled"] + 1
    assert after["unet_calls"] - before["unet_calls"] < 2000, "the 2000-step crop did not run to the end"
    started = time.monotonic()
    inpainter_handle.refine.remote([job(64, 8, SamplingSettings(steps=2))], None).result(timeout_s=60)
    assert time.monotonic() - started < 30


def test_reconfigure_rejects_unknown_keys(tiny_sd: dict):
    """Checked on the class itself: no replica needed to validate a user_config."""
    deployment = InpainterDeployment.__new__(InpainterDeployment)
    with pytest.raises(ValueError, match="unknown"):
        deployment.reconfigure({"batch_wait_timeout_s": 0.1})
