"""configs/gpu.yaml's graph on a real multi-node Ray cluster: packing, autoscaling, node loss.

One ``ray.cluster_utils.Cluster`` for the whole module (tests/cluster/harness.py): a head and two
workers with one logical GPU each, the application deployed from gpu.yaml through the documented
overlay (sim:// models on CPU, autoscaling delays in seconds, a request deadline of
:data:`REQUEST_TIMEOUT_S`). The scenarios run once each, in order, on the same cluster; the last
two remove a node each. Every wait has a deadline.

Measured figures (scale-up/down times, node-loss counts) are printed; the scaling benchmark
(benchmarks/scaling.py) records them with plots in docs/scaling.md.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.cluster.harness import (
    INPAINT_HEAVY,
    MODEL_DEPLOYMENTS,
    SAM_HEAVY,
    LoadRun,
    ReplicaSampler,
    SimulatedCluster,
    healthz,
    simulated_cluster,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(900)]

GPU_FRACTIONS = {"Detector": 0.1, "Sam": 0.2, "Inpainter": 0.7}
# gpu.yaml's 300 s, shortened so that waiting out a request with no GPU left stays short
REQUEST_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def rehearsal():
    with simulated_cluster(extra_sets=[f"limits.request_timeout_s={REQUEST_TIMEOUT_S}"]) as cluster:
        yield cluster


def ramp(run: LoadRun, start: int, end: int, seconds: float) -> None:
    steps = abs(end - start)
    for index in range(1, steps + 1):
        run.set_clients(start + (index if end > start else -index))
        time.sleep(seconds / steps)


def test_one_gpu_carries_detector_sam_and_inpainter(rehearsal: SimulatedCluster):
    """Each replica reports its logical GPU; best-fit packing fills one GPU with 0.1 + 0.2 + 0.7."""
    worker_nodes = {worker.node_id for worker in rehearsal.workers}
    by_node: dict[str, list[tuple[str, list[str]]]] = {}
    for deployment in MODEL_DEPLOYMENTS:
        placements = rehearsal.placements(deployment)
        assert len(placements) == rehearsal.running(deployment) == 1, deployment
        for placement in placements:
            gpus = placement["accelerator_ids"].get("GPU")
            assert gpus == ["0"], f"{deployment} got GPUs {gpus}"  # each worker has one GPU, id 0
            assert placement["node_id"] in worker_nodes, deployment
            by_node.setdefault(placement["node_id"], []).append((deployment, gpus))
    print("\nplacement:", {node[:8]: members for node, members in by_node.items()})
    [(node, members)] = by_node.items()  # all three on one node, i.e. on its one GPU
    assert sorted(name for name, _ in members) == sorted(MODEL_DEPLOYMENTS)
    assert sum(GPU_FRACTIONS[name] for name, _ in members) == pytest.approx(1.0)
    # The ingress stays on the head (no GPU), where losing a GPU node cannot take it down. Ray's
    # GCS actor table (the state API would need the dashboard, which the harness leaves out).
    import ray

    ingress_nodes = {
        info["Address"]["NodeID"]
        for info in ray._private.state.actors().values()
        if info["ActorClassName"].endswith(":FaceDetailerIngress") and info["State"] == "ALIVE"
    }
    assert ingress_nodes == {rehearsal.cluster.head_node.node_id}


def test_inpainter_scales_up_under_a_ramp_and_back_down_under_load(rehearsal: SimulatedCluster):
    """0 → 16 closed-loop clients → 2 → 0: the inpainter grows from min_replicas, and shrinks back to
    it while 2 clients still send (the stopping replica drains its requests: every answer is a 200); SAM stays."""
    run = LoadRun(rehearsal.url, INPAINT_HEAVY)
    sampler = ReplicaSampler(rehearsal, run.epoch).start()
    run.start(0)
    try:
        ramp(run, 0, 16, 8.0)
        up = wait_until(lambda: rehearsal.running("Inpainter") >= 2, 120, what="a second inpainter replica running")
        # 0.7 + 0.7 > 1: the second inpainter must take the other worker's GPU
        spread = {(p["node_id"], tuple(p["accelerator_ids"]["GPU"])) for p in rehearsal.placements("Inpainter")}
        time.sleep(3)
        load_end = run.now()
        ramp(run, 16, 2, 4.0)
        down = wait_until(lambda: rehearsal.running("Inpainter") == 1, 120, what="back to one inpainter under load")
        downscaled_at = run.now()
        time.sleep(4)  # the 2 clients go on with one replica
        ramp(run, 2, 0, 1.0)
        run.stop()
    finally:
        run.stop()
        sampler.stop()
    statuses = Counter(record.status for record in run.records)
    spanning = [record for record in run.records if record.started < downscaled_at < record.ended]
    print(f"\nramp: {len(run.records)} requests {dict(statuses)}; inpainter ≥ 2 replicas {up + 8:.1f} s after the "
          f"ramp began; back to 1 {down:.1f} s after the clients fell to 2 ({len(spanning)} requests in flight "
          f"then); peak {sampler.peak('Inpainter')} running")
    assert statuses[200] == len(run.records) > 0, [r.error for r in run.records if r.status != 200][:3]
    assert sampler.peak("Inpainter") >= 2
    assert len(spread) >= 2 and len({node for node, _ in spread}) >= 2, spread
    assert sampler.peak("Sam", 0, load_end) == 1  # SAM was not used: it did not scale
    assert spanning  # the downscale happened under load


def test_sam_heavy_load_scales_sam_and_not_the_inpainter(rehearsal: SimulatedCluster):
    wait_until(lambda: rehearsal.running("Inpainter") == 1 and rehearsal.running("Sam") == 1, 120,
               what="the service at rest")
    run = LoadRun(rehearsal.url, SAM_HEAVY)
    sampler = ReplicaSampler(rehearsal, run.epoch).start()
    run.start(16)
    try:
        up = wait_until(lambda: rehearsal.running("Sam") >= 2, 120, what="a second SAM replica running")
        time.sleep(5)
        load_end = run.now()
        run.stop()
        down = wait_until(lambda: rehearsal.running("Sam") == 1, 120, what="back to one SAM replica")
    finally:
        run.stop()
        sampler.stop()
    statuses = Counter(record.status for record in run.records)
    print(f"\nSAM-heavy: {len(run.records)} requests {dict(statuses)}; SAM ≥ 2 after {up:.1f} s, peak "
          f"{sampler.peak('Sam')}; back to 1 {down:.1f} s after the load; inpainter peak "
          f"{sampler.peak('Inpainter', 0, load_end)}")
    assert statuses[200] == len(run.records) > 0, [r.error for r in run.records if r.status != 200][:3]
    assert sampler.peak("Inpainter", 0, load_end) == 1


def test_losing_a_gpu_node_mid_load(rehearsal: SimulatedCluster):
    """remove_node of the packed worker under load: clients that do not retry get 200 every time.

    The calls whose replicas died with the node are sent again by the ingress and wait for Serve
    to start replicas on the surviving GPU (serve_app/model_calls.py)."""
    [inpainter] = rehearsal.placements("Inpainter")
    victim = rehearsal.node_of(inpainter["node_id"])
    survivor = next(worker for worker in rehearsal.workers if worker is not victim)
    load = LoadRun(rehearsal.url, INPAINT_HEAVY, request_timeout_s=120)
    retrying = LoadRun(rehearsal.url, INPAINT_HEAVY, request_timeout_s=120, retry_on_503=True, requests_per_client=8)
    load.start(6)
    retrying.start(2)
    try:
        time.sleep(6)
        removed_at = load.now()
        rehearsal.cluster.remove_node(victim, allow_graceful=False)
        back = wait_until(
            lambda: rehearsal.all_on(survivor.node_id), 180, 1.0, "every model deployment running on the survivor"
        )
        time.sleep(5)
        load.stop(deadline_s=180)
        wait_until(retrying.done, 240, 1.0, "the retrying clients finished their requests")
        retrying.stop(deadline_s=60)
    finally:
        load.stop(deadline_s=180)
        retrying.stop(deadline_s=180)
    healthy = wait_until(lambda: healthz(rehearsal.url) == 200, 120, 2.0, "/healthz 200 again")
    statuses = Counter(record.status for record in load.records)
    during = [record for record in load.records if record.started < removed_at < record.ended]
    print(f"\nnode loss: {len(load.records)} requests {dict(statuses)} ({len(during)} in flight at the removal, "
          f"slowest {max((r.latency for r in during), default=0):.1f} s); models running again {back:.1f} s after; "
          f"/healthz 200 {healthy:.1f} s later; retrying clients: {Counter(r.status for r in retrying.records)}, "
          f"attempts {sum(r.attempts for r in retrying.records)}")
    assert statuses[200] == len(load.records), [(record.status, record.error) for record in load.records
                                                if record.status != 200][:5]  # fmt: skip
    assert during  # requests were in flight when their replicas died
    assert [record.status for record in retrying.records] == [200] * 16
    assert sum(record.attempts for record in retrying.records) == 16  # never told to retry
    assert rehearsal.all_on(survivor.node_id)


def test_with_every_gpu_node_gone_a_request_is_a_503_with_retry_after(rehearsal: SimulatedCluster):
    """No replica can be placed before the deadline: 503 with Retry-After (not a hang, not a 504)."""
    [survivor] = rehearsal.cluster.worker_nodes  # the GPU node the previous test left
    load = LoadRun(rehearsal.url, INPAINT_HEAVY, request_timeout_s=REQUEST_TIMEOUT_S + 60, requests_per_client=1)
    load.start(2)
    time.sleep(1.0)  # the requests are in flight when the last GPU node goes
    rehearsal.cluster.remove_node(survivor, allow_graceful=False)
    try:
        wait_until(load.done, REQUEST_TIMEOUT_S + 90, 1.0, "both requests answered")
    finally:
        load.stop(deadline_s=REQUEST_TIMEOUT_S + 90)
    print(f"\nno GPU left: {[(r.status, r.retry_after, round(r.latency, 1), r.error) for r in load.records]}")
    assert [record.status for record in load.records] == [503, 503]
    assert all(record.retry_after for record in load.records)
    assert all(record.latency < REQUEST_TIMEOUT_S + 30 for record in load.records)
