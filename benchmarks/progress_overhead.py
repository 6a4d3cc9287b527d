#!/usr/bin/env python
"""What following a request's progress costs: the same request with and without step events.

The served graph of ``configs/local-cpu.yaml`` (real face detector, tiny inpainter) on zidane.jpg
(2 faces), the kinds of request interleaved (their order rotating from round to round),
``--requests`` of each after warm-up:

- ``plain``: ``POST /v1/detail?format=json`` — no listener: the inpainter is called as before
  (a unary ``refine``) and its engine builds no progress report at all;
- ``stream_faces``: ``/v1/detail/stream`` with ``progress=false`` (the stream as it was: face events);
- ``stream_steps``: ``/v1/detail/stream`` (the default: plan and a progress event per sampler step,
  sent by the inpainter replica over a Ray Serve streaming call);
- ``stream_previews``: the same with ``preview_every=1`` (a latent preview JPEG at every step).

Run it on this branch and, for "today", on another checkout with ``--repo`` (its code is imported
and served; kinds it does not know are left out)::

    .venv/bin/python benchmarks/progress_overhead.py --json /tmp/progress-branch.json
    .venv/bin/python benchmarks/progress_overhead.py --repo /path/to/main --json /tmp/progress-main.json

Each figure is the client's wall time per request (median, p10, p90) and the service's own
``timings.total``. Run it on an otherwise idle machine; the load is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

KINDS = ("plain", "stream_faces", "stream_steps", "stream_previews")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loadavg() -> list[float]:
    return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def request(http: Any, kind: str, photo: bytes, params: dict[str, Any]) -> tuple[float, float, int]:
    """(client seconds, service total seconds, events received) of one request."""
    files = {"image": ("zidane.jpg", photo, "image/jpeg")}
    data = {"params": json.dumps(params)}
    started = time.perf_counter()
    if kind == "plain":
        answer = http.post("/v1/detail?format=json", files=files, data=data)
        answer.raise_for_status()
        return time.perf_counter() - started, answer.json()["timings"]["total"], 0
    if kind == "stream_faces":
        data["progress"] = "false"
    elif kind == "stream_previews":
        data["preview_every"] = "1"
    events, result = 0, None
    with http.stream("POST", "/v1/detail/stream", files=files, data=data) as answer:
        answer.raise_for_status()
        name = None
        for line in answer.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
                events += 1
            elif line.startswith("data: ") and name in ("result", "error"):
                result = json.loads(line[6:])
    if result is None or "timings" not in result:
        raise RuntimeError(f"{kind}: no result ({result})")
    return time.perf_counter() - started, result["timings"]["total"], events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to serve")
    parser.add_argument("--requests", type=int, default=8, help="requests of each kind (after 2 warm-up rounds)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guide-size", type=int, default=256)
    parser.add_argument("--max-size", type=int, default=512)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--json", type=Path, required=True)
    opts = parser.parse_args()

    repo = opts.repo.resolve()
    os.chdir(repo)  # Ray puts the driver's working directory on the replicas' paths
    sys.path.insert(0, str(repo))
    cache = Path(os.environ.get("FACEDETAILER_TEST_CACHE", repo / ".cache" / "tests"))
    os.environ.setdefault("FACEDETAILER_TINY_MODELS", str(cache / "tiny-models"))
    import yaml

    config_path = repo / "configs" / "local-cpu.yaml"
    [application] = [a for a in yaml.safe_load(config_path.read_text())["applications"] if a["name"] == "facedetailer"]
    os.environ.update({key: str(value) for key, value in application["runtime_env"]["env_vars"].items()})
    from deployments.runtime_env import apply_offline_env

    apply_offline_env(Path(os.environ.get("YOLO_CONFIG_DIR", "/tmp/facedetailer-ultralytics")))
    import httpx
    import ray
    from ray import serve

    from deployments.testing import assets
    from serve_app.cli import start_serving

    photo = Path(assets.ultralytics_asset("zidane.jpg")).read_bytes()
    params = {"steps": opts.steps, "guide_size": opts.guide_size, "max_size": opts.max_size, "seed": 1}
    kinds = [kind for kind in opts.kinds.split(",") if kind]
    load_start = loadavg()
    started = time.time()
    port = free_port()
    start_serving(config_path, port=port, join_cluster=False)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, trust_env=False) as http:
            probe = http.post("/v1/detail/stream", files={"image": ("z.jpg", photo, "image/jpeg")},
                              data={"params": json.dumps({**params, "steps": 1}), "progress": "false"})  # fmt: skip
            if probe.status_code == 422 and "progress" in probe.text:  # a checkout without stream options
                kinds = [kind for kind in kinds if kind in ("plain", "stream_faces")]
                faces_only = True
            else:
                faces_only = False
            for _ in range(2):
                for kind in kinds:
                    request(http, "stream_steps" if kind == "stream_faces" and faces_only else kind, photo, params)
            samples: dict[str, dict[str, list[float]]] = {kind: {"client_s": [], "service_s": [], "events": []}
                                                          for kind in kinds}  # fmt: skip
            for round_index in range(opts.requests):
                shift = round_index % len(kinds)  # each kind takes each place in the round in turn
                for kind in kinds[shift:] + kinds[:shift]:
                    # a checkout without stream options: its plain stream is the faces-only stream
                    sent = "stream_steps" if kind == "stream_faces" and faces_only else kind
                    client_s, service_s, events = request(http, sent, photo, params)
                    samples[kind]["client_s"].append(client_s)
                    samples[kind]["service_s"].append(service_s)
                    samples[kind]["events"].append(events)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary = {
        kind: {
            "client_ms": {name: round(fn(values["client_s"]) * 1e3, 1) for name, fn in STATS.items()},
            "service_total_ms": {name: round(fn(values["service_s"]) * 1e3, 1) for name, fn in STATS.items()},
            "events_per_request": statistics.median(values["events"]),
        }
        for kind, values in samples.items()
    }
    result = {
        "benchmark": "progress_overhead",
        "repo": str(repo),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "params": params,
        "requests_per_kind": opts.requests,
        "load": {"start": load_start, "end": loadavg()},
        "summary": summary,
        "samples": samples,
    }
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(result, indent=1))
    print(f"repo {repo}  load {load_start} → {result['load']['end']}")
    for kind, figures in summary.items():
        client, service = figures["client_ms"], figures["service_total_ms"]
        print(f"{kind:16s} client p50 {client['p50']:8.1f} ms (p10 {client['p10']:.1f}, p90 {client['p90']:.1f})"
              f"  service p50 {service['p50']:8.1f} ms  events {figures['events_per_request']}")  # fmt: skip


STATS = {"p10": lambda v: percentile(v, 0.1), "p50": statistics.median, "p90": lambda v: percentile(v, 0.9)}


if __name__ == "__main__":
    main()
