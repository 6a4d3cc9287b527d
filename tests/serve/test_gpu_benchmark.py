"""benchmarks/gpu.py runs end to end (``--tiny``: tiny models on the CPU) and skips cleanly without a GPU.

The figures themselves are the benchmark's business; here: the served graph of configs/gpu.yaml
deploys with this machine's models, answers, reports its stages, requests/s, UNet batch sizes
and per-replica memory, reports an option the config does not have as unavailable, and leaves
nothing deployed. It deploys next to the session's apps (one Ray instance per test session).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_and_exits_0(gpu_bench, monkeypatch, capsys) -> None:
    monkeypatch.setattr(gpu_bench, "gpu_available", lambda: False)
    assert gpu_bench.main([]) == 0
    assert "no CUDA GPU on this machine; skipped" in capsys.readouterr().out


def test_tiny_run_end_to_end(gpu_bench, serve_instance, tiny_sd: dict) -> None:
    from ray import serve

    options = gpu_bench.parse_args([
        "--tiny", "--models", "sd15", "--variants", "fp32,compiled", "--levels", "1,2", "--warmup", "1",
        "--repeats", "1", "--per-client", "1", "--min-requests", "2", "--cpus", "0.01",
    ])  # fmt: skip
    results = gpu_bench.measure(options)
    figures = results["variants"]["fp32"]["sd15"]
    assert {"detect", "inpaint"} <= set(figures["stages_s"]), figures["stages_s"]
    assert [row["clients"] for row in figures["levels"]] == [1, 2]
    evaluations = []
    for row in figures["levels"]:
        assert row["requests_per_s"] > 0 and row["requests"] == 2
        evaluations.append(sum(size * calls for size, calls in row["unet_batch_sizes"].items()))
    assert evaluations[0] == evaluations[1] >= 2 * 2, "the same crop-steps at each level (≥ 2 requests × 2 steps)"
    assert set(figures["levels"][0]["unet_batch_sizes"]) == {1}, "one client: one crop per call"
    assert set(figures["peak_memory"]) == {"Detector", "Sam", "Inpainter"}
    assert all(memory == {"device": "cpu"} for memory in figures["peak_memory"].values())
    assert "compile" in results["variants"]["compiled"]["unavailable"]
    assert "fp32 / sd15" in gpu_bench.report(results)
    assert gpu_bench.APP_NAME not in serve.status().applications
