"""Several checkpoints on the inpainter deployment (issue 12 part 3), in Serve's local testing mode.

Two tiny SD checkpoints with different random weights (``tiny_sd`` and ``tiny_sd_alt``) and the
same tiny model again under a third name. Local testing mode runs the deployment class in this
process (no Ray cluster); Serve's own multiplexer needs a replica, so there the deployment
applies the same LRU policy itself — the served graph's multiplexing is tested over HTTP in
``tests/serve/test_checkpoints_http.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from ray import serve

from deployments.checkpoints import checkpoint_specs, load_options, sum_snapshots
from deployments.inpainter import RefineJob, SamplingSettings
from deployments.serving import InpainterDeployment
from tests.deployments.test_inpainter import write_kohya_lora

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

FAST = SamplingSettings(steps=3, denoise=0.6, cfg=5.0)


def image(seed: int, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def job(seed: int, **fields: object) -> RefineJob:
    values = {"positive": ("a face",), "negative": ("blurry",), "noise_mask": None, **fields}
    return RefineJob(image=image(seed), seed=seed, **values)  # type: ignore[arg-type]


def deploy(checkpoints: dict, max_models: int, **options: object):
    app = serve.deployment(InpainterDeployment, name="Inpainter").bind(
        checkpoints, device="cpu", max_models_per_replica=max_models, **options
    )
    return serve.run(app, name="checkpoints-test", _local_testing_mode=True)


def refine(handle, name: str | None, jobs: list[RefineJob]):
    options = handle.options(multiplexed_model_id=name) if name else handle
    return options.refine.remote(jobs, FAST, name)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("checkpoint-loras")


@pytest.fixture(scope="module")
def two(tiny_sd: dict, tiny_sd_alt: dict, lora_dir):
    return deploy({"sd": tiny_sd["pipeline"], "alt": tiny_sd_alt["pipeline"]}, 2, lora_dir=str(lora_dir))


def test_config_forms_and_a_request_gets_the_checkpoint_it_names(two) -> None:
    assert checkpoint_specs("x") == {"default": {"model": "x", "single_file_config": None}}
    assert list(checkpoint_specs({"a": "x", "b": {"model": "y", "single_file_config": "z"}})) == ["a", "b"]
    info = two.info.remote().result()
    assert list(info["checkpoints"]) == ["sd", "alt"] and info["max_models_per_replica"] == 2
    crop = [job(1)]
    default = refine(two, None, crop).result().images[0]
    sd = refine(two, "sd", crop).result().images[0]
    alt = refine(two, "alt", crop).result().images[0]
    assert np.array_equal(default, sd), "no name: the first checkpoint"
    assert np.abs(alt.astype(int) - sd).mean() > 5, "other weights, other result"
    assert np.array_equal(refine(two, "alt", crop).result().images[0], alt)
    assert two.info.remote().result()["loaded_checkpoints"] == ["sd", "alt"]
    with pytest.raises(ValueError, match="unknown checkpoint 'sdxl'; configured: sd, alt"):
        refine(two, "sdxl", crop).result()


def test_precision_is_opt_in_per_checkpoint(tiny_sd: dict) -> None:
    """``precision: bf16`` runs that checkpoint alone in bfloat16; the others keep the deployment's dtype."""
    assert load_options({"model": "x", "precision": "bf16"}, {"dtype": "float32", "device": "cpu"}) == {
        "model": "x", "dtype": "bfloat16", "device": "cpu"
    }
    assert load_options({"model": "x"}, {"dtype": None}) == {"model": "x", "dtype": None}
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        load_options({"model": "x", "precision": "int8"}, {})
    handle = deploy({"sd": tiny_sd["pipeline"], "sd-bf16": {"model": tiny_sd["pipeline"], "precision": "bf16"}}, 2)
    crop = [job(3)]
    full = refine(handle, "sd", crop).result().images[0]
    reduced = refine(handle, "sd-bf16", crop).result().images[0]
    described = handle.info.remote().result()["checkpoints"]
    assert described["sd"]["dtype"] == "float32" and described["sd-bf16"]["dtype"] == "bfloat16"
    assert not np.array_equal(full, reduced), "bfloat16 rounds differently"
    assert np.array_equal(refine(handle, "sd", crop).result().images[0], full)


def test_crops_of_different_checkpoints_never_share_a_unet_batch(two) -> None:
    """Concurrent requests on both checkpoints: each engine's calls carry only its own crops."""
    before = per_checkpoint(two)
    sd_jobs, alt_jobs = [job(10), job(11)], [job(12), job(13), job(14)]
    responses = [refine(two, "sd", sd_jobs), refine(two, "alt", alt_jobs)]
    sd_result, alt_result = (response.result() for response in responses)
    after = per_checkpoint(two)
    for name, count in (("sd", 2), ("alt", 3)):
        evaluations = after[name]["unet_crop_evaluations"] - before[name]["unet_crop_evaluations"]
        assert evaluations == count * FAST.steps, f"{name}'s engine evaluated only its own crops"
        new_sizes = {
            size for size, calls in after[name]["unet_batch_sizes"].items()
            if calls > before[name]["unet_batch_sizes"].get(size, 0)
        }  # fmt: skip
        assert max(new_sizes) <= count, f"{name}: no UNet call held the other checkpoint's crops"
    assert max(new_sizes) == 3, "crops of one checkpoint still share calls"
    for name, jobs, result in (("sd", sd_jobs, sd_result), ("alt", alt_jobs, alt_result)):
        for item, shared in zip(jobs, result.images, strict=True):
            alone = refine(two, name, [item]).result().images[0]
            assert np.abs(alone.astype(int) - shared).max() <= 1


def per_checkpoint(handle) -> dict[str, dict]:
    return handle.checkpoint_snapshots.remote().result()


def test_lora_tags_work_per_request_on_each_checkpoint(two, lora_dir) -> None:
    write_kohya_lora(lora_dir / "tiny_style.safetensors", None)  # type: ignore[arg-type]
    lora = (("tiny_style", 1.0, 1.0),)
    for name in ("sd", "alt"):
        plain = refine(two, name, [job(3)]).result().images[0]
        styled, unstyled = refine(two, name, [job(3, loras=lora), job(3)]).result().images
        # batched with the styled crop, the unstyled one may differ by round-off (one uint8 level)
        assert np.abs(styled.astype(int) - plain).mean() > 5 and np.abs(unstyled.astype(int) - plain).max() <= 1, name


def test_least_recently_used_checkpoint_is_evicted_after_its_requests_finish(tiny_sd: dict, tiny_sd_alt: dict) -> None:
    three = deploy({"a": tiny_sd["pipeline"], "b": tiny_sd_alt["pipeline"], "c": tiny_sd["pipeline"]}, 2)
    loaded = lambda: three.info.remote().result()["loaded_checkpoints"]  # noqa: E731
    assert loaded() == ["a"]  # the first is loaded at start
    first_a = refine(three, "a", [job(5)]).result().images[0]
    # a long request on b, then a is used again: b is the least recently used while still running
    long_b = three.options(multiplexed_model_id="b").refine.remote(
        [job(7)], SamplingSettings(steps=60, denoise=1.0), "b"
    )
    refine(three, "a", [job(6)]).result()
    assert set(loaded()) == {"a", "b"}
    c_result = refine(three, "c", [job(5)]).result()  # evicts b: after b's request finishes
    finished = long_b.result(timeout_s=120)  # stopping b's engine mid-request would leave it hanging
    assert finished.images[0].shape == (64, 64, 3) and finished.unet_evaluations == [60]
    assert set(loaded()) == {"a", "c"}
    assert np.array_equal(c_result.images[0], first_a), "c is the same weights as a under another name"
    stats = three.stats.remote().result()
    assert stats["crops_completed"] == 4, "a: 2, c: 1, and the unloaded b: 1 (its counters are kept)"


def test_summed_snapshots_add_counters_and_keep_bounds() -> None:
    def snapshot(calls: int, size: int) -> dict:
        return {
            "unet_calls": calls, "unet_crop_evaluations": calls * size, "unet_rows": 2 * calls * size, "steps": calls,
            "active_crops": 1, "queued_crops": 0, "crops_submitted": size, "crops_completed": size,
            "crops_failed": 0, "crops_cancelled": 0, "requests_rejected": 0, "unet_batch_sizes": {size: calls},
            "unet_seconds": 0.5, "max_batch_size": 8, "max_queued_crops": 64,
            "queue_wait_s": {"count": 1, "total": 0.1, "max": 0.1, "recent": [0.1]},
        }  # fmt: skip

    total = sum_snapshots([snapshot(3, 2), snapshot(4, 2), snapshot(1, 5)])
    assert total["unet_batch_sizes"] == {2: 7, 5: 1} and total["unet_calls"] == 8
    assert total["unet_crop_evaluations"] == 19 and total["active_crops"] == 3
    assert total["queue_wait_s"]["count"] == 3 and total["max_batch_size"] == 8
