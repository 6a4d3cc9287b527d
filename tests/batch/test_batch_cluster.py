"""A bulk job on a multi-node cluster (simulated GPUs): a Ray worker killed mid-run loses no image.

``ray.cluster_utils.Cluster`` with a head and two nodes of one logical GPU each (the harness of
tests/cluster); the job is configs/gpu.yaml's graph through the simulated overlay, so the
detector (0.1 GPU) and the inpainter (0.7 GPU) actor pools are placed by their GPU fractions.
Mid-run the test SIGKILLs the process of a refine actor — the one holding crops in its engine.
Ray Data restarts the actor and runs its batches again; every image must come out once.
Marked ``cluster``: it runs first in the session, and owns (then shuts down) its cluster.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.cluster.harness import GPU_CONFIG, SIMULATED_OVERLAY, gpu_nodes, sample_image, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

IMAGES = 16
SETS = ["inpainter.model=sim://sd15-inpainting?a=0.12&b=0"]  # 0.12 s per UNet call: a run of ~15 s
PARAMS = {"steps": 8, "guide_size": 128, "max_size": 256}


@pytest.fixture(scope="module")
def cluster():
    with gpu_nodes(2) as nodes:
        yield nodes


def refine_actors() -> list[dict]:
    import ray

    return [
        info
        for info in ray._private.state.actors().values()
        if "RefineFaces" in info["ActorClassName"] and info["State"] == "ALIVE"
    ]


def test_a_refine_worker_killed_mid_run_loses_no_image(cluster, tmp_path: Path):
    from serve_app.batch import run_batch

    inputs = tmp_path / "in"
    inputs.mkdir()
    for index in range(IMAGES):
        (inputs / f"img-{index:02d}.png").write_bytes(sample_image(index))
    output = tmp_path / "out"
    outcome: dict = {}

    def job() -> None:
        try:
            outcome["summary"] = run_batch(
                str(inputs), str(output), config=GPU_CONFIG, overlays=[SIMULATED_OVERLAY], sets=SETS, params=PARAMS,
                batch_size=1, progress=False,
            )  # fmt: skip
        except BaseException as error:  # reported by the assertion below
            outcome["error"] = error

    runner = threading.Thread(target=job, daemon=True)
    runner.start()
    journal = output / ".batch" / "journal"
    wait_until(lambda: (journal.is_dir() and any(journal.iterdir())) or not runner.is_alive(), 300, 0.05,
               "the first images recorded")  # fmt: skip
    assert runner.is_alive(), outcome
    [victim, *_] = refine_actors()
    os.kill(victim["Pid"], signal.SIGKILL)
    recorded_at_kill = len(list(journal.iterdir()))
    runner.join(timeout=400)
    assert not runner.is_alive() and "error" not in outcome, outcome
    summary = outcome["summary"]
    assert (summary.succeeded, summary.failed, summary.exit_code) == (IMAGES, 0, 0)
    assert recorded_at_kill < IMAGES  # killed mid-run
    rows = pq.read_table(output / "manifest.parquet").to_pylist()
    assert sorted(row["key"] for row in rows) == [f"img-{index:02d}" for index in range(IMAGES)]
    assert all(row["status"] == "ok" and row["faces_refined"] == 1 for row in rows)
    assert sorted(path.name for path in output.iterdir()) == sorted(
        [f"img-{index:02d}.png" for index in range(IMAGES)] + ["manifest.parquet", ".batch"]
    )
    # the engine of each refine actor batched crops of several images (two GPUs: up to two actors)
    assert max(int(size) for size in summary.engine["unet_batch_sizes"]) > 1, summary.engine
    print(f"\nkilled refine actor pid {victim['Pid']} after {recorded_at_kill} of {IMAGES} images were recorded; "
          f"UNet calls by crops per call: {summary.engine['unet_batch_sizes']}")
