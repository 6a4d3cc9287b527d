"""Load and chaos: 10 minutes of locust traffic while model replicas are killed at random (docs/reliability.md).

Two served applications, each started here on a private Ray instance with API keys on
(``configs/overlays/auth-demo.yaml`` plus a key file of three load-test keys):

- ``local``: ``configs/local-cpu.yaml`` — the real face YOLO (faceghost ONNX) and the tiny
  random-weight inpainter on CPU; valid requests send a real photo (scikit-image's astronaut).
- ``sim``: ``configs/gpu.yaml`` + ``configs/overlays/simulated-cpu.yaml`` — the production graph
  (GPU fractions, autoscaling) on ``sim://`` models, Ray declaring two logical GPUs.

``benchmarks/locustfile.py`` runs headless: each user has one of five keys (the two demo keys and
three load keys) and sends valid ``/v1/detail`` and ``/v1/detail/stream`` requests and invalid
ones (not an image, a value over a limit, unknown models, malformed JSON, no key, a wrong key,
``/v1/stats`` without the admin scope). Meanwhile a thread kills a random replica of a random
model deployment — one running a call when there is one — (``ray.kill`` of its actor and SIGKILL
of its process, in turn) every 20–60 s,
and the RSS of every Ray process is sampled. Every answer is recorded; lost = no answer (a
connection error, nothing within the client's timeout, a stream cut before its end).

Run under the heavy-command lock on a quiet machine (about 25 minutes for both)::

    flock /tmp/fd-heavy.lock .venv/bin/python benchmarks/chaos.py
    .venv/bin/python benchmarks/chaos.py --render-from benchmarks/chaos.json   # re-render only
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.serve.replica_chaos import (  # noqa: E402
    LocustRun,
    MemorySampler,
    RandomKiller,
    memory_snapshot,
    summarize,
)

APP_NAME = "facedetailer"
DEMO_KEYS = {"demo-detail": "demo-detail-key", "demo-admin": "demo-admin-key"}  # configs/overlays/auth-demo.yaml
LOAD_KEY_IDS = ("load-a", "load-b", "load-c")
SETUPS: dict[str, dict[str, Any]] = {
    "local": {
        "config": "configs/local-cpu.yaml",
        "overlays": ["configs/overlays/auth-demo.yaml"],
        "ray": {"num_cpus": 2},
        "models": ["Detector", "Inpainter"],  # the requests do not use SAM (LiteMedSAM on 2 cores)
        # the astronaut's face, 4 steps of the tiny UNet on a 256² crop
        "params": {"steps": 4, "guide_size": 256, "max_size": 256, "seed": 1},
        "users": 6,
    },
    "sim": {
        "config": "configs/gpu.yaml",
        "overlays": ["configs/overlays/simulated-cpu.yaml", "configs/overlays/auth-demo.yaml"],
        "ray": {"num_cpus": 12, "num_gpus": 2},
        "models": ["Detector", "Sam", "Inpainter"],
        # SAM's 0.45-s embedding, then one 512² crop for 20 steps (≈ 0.9 s of modelled A100 time alone)
        "params": {"steps": 20, "guide_size": 512, "max_size": 512, "seed": 1, "use_sam": True},
        "users": 8,
    },
}


def quiet_machine() -> dict[str, Any]:
    """The conditions: load average, CPUs, and the busiest other processes right now."""
    import psutil

    for process in psutil.process_iter():
        try:
            process.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(2.0)
    busy = []
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            share = process.cpu_percent(None)
        except psutil.Error:
            continue
        if share >= 5.0 and process.pid != os.getpid():
            command = " ".join(process.info["cmdline"] or [])[:120]
            busy.append({"pid": process.pid, "cpu_percent": share, "command": command})
    return {"load_average": [round(value, 2) for value in os.getloadavg()], "cpus": os.cpu_count(),
            "busy_processes": sorted(busy, key=lambda row: -row["cpu_percent"])[:5]}  # fmt: skip


def write_load_keys(folder: Path) -> dict[str, str]:
    """Three keys with the detail scope and no quota, in a key file the service reads (``auth.keys_file``)."""
    import yaml

    from serve_app.auth.keys import key_entry, new_key

    keys = {key_id: new_key() for key_id in LOAD_KEY_IDS}
    entries = [key_entry(key_id, key, ["detail"]) for key_id, key in keys.items()]
    (folder / "keys.yaml").write_text(yaml.safe_dump({"keys": entries}))
    return keys


def face_photo(folder: Path) -> Path:
    from PIL import Image

    from deployments.testing import assets

    path = folder / "astronaut.png"
    image = Image.fromarray(assets.astronaut()).resize((256, 256), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def retries_logged() -> int:
    """Model calls the ingress sent again (its log lines; serve_app/model_calls.py)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return sum(
        path.read_text(errors="replace").count("retrying on a live replica")
        for path in logs.glob(f"replica_{APP_NAME}_FaceDetailerIngress_*.log")
    )


def run_setup(name: str, duration_s: float, kill_every: tuple[float, float], users: int | None) -> dict[str, Any]:
    import ray
    from ray import serve

    from serve_app.cli import _application, load_config, start_serving
    from tests.cluster.harness import free_port, healthz, wait_until

    setup = SETUPS[name]
    folder = Path(tempfile.mkdtemp(prefix=f"fd-chaos-{name}-"))
    load_keys = write_load_keys(folder)
    port = free_port()
    sets = [f"serve.http_options.port={port}", f"auth.keys_file={folder / 'keys.yaml'}"]
    config_path = REPO / setup["config"]
    overlays = [REPO / overlay for overlay in setup["overlays"]]
    config = load_config(config_path, overlays, sets)
    env_vars = {key: str(value) for key, value in _application(config)["runtime_env"]["env_vars"].items()}
    if name == "local":
        env_vars["FACEDETAILER_TINY_MODELS"] = os.environ["FACEDETAILER_TINY_MODELS"]
    conditions = quiet_machine()
    print(f"[{name}] conditions: {conditions}", flush=True)
    started = time.monotonic()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env_vars},
             **setup["ray"])  # fmt: skip
    try:
        start_serving(config_path, overlays=overlays, sets=sets)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthz(url) == 200, 600, 2.0, "the application answers /healthz 200")
        startup_s = time.monotonic() - started
        print(f"[{name}] serving at {url} after {startup_s:.0f} s", flush=True)
        keys = {**DEMO_KEYS, **load_keys}
        image = face_photo(folder) if name == "local" else None
        # warm-up: every replica has served before the memory baseline
        warm = LocustRun(host=url, records_path=folder / "warm.jsonl", users=2, spawn_rate=2, duration_s=30,
                         keys={"demo-admin": DEMO_KEYS["demo-admin"]}, admin_keys=["demo-admin"],
                         params=setup["params"], image=image).start()  # fmt: skip
        warm.wait()
        memory_start = memory_snapshot()
        sampler = MemorySampler(interval_s=30.0).start()
        killer = RandomKiller(APP_NAME, setup["models"], interval_s=kill_every, seed=19)
        load = LocustRun(host=url, records_path=folder / "records.jsonl", users=users or setup["users"],
                         spawn_rate=2, duration_s=duration_s, keys=keys, admin_keys=["demo-admin"],
                         params=setup["params"], image=image, timeout_s=300).start()  # fmt: skip
        load_started = time.time()
        killer.start()
        output = load.wait()
        killer.stop()
        sampler.stop()
        memory_end = memory_snapshot()
        records = load.records()
        replicas = {deployment: dict(status.replica_states)
                    for deployment, status in serve.status().applications[APP_NAME].deployments.items()}  # fmt: skip
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "setup": {key: value for key, value in setup.items() if key != "ray"} | {"ray": setup["ray"]},
            "users": users or setup["users"],
            "duration_s": duration_s,
            "kill_every_s": list(kill_every),
            "startup_s": startup_s,
            "conditions_before": conditions,
            "load_started": load_started,
            "summary": summarize(records),
            "kills": [vars(kill) for kill in killer.kills],
            "kill_failures": killer.failures,
            "retries_logged": retries_logged(),
            "memory_start": memory_start,
            "memory_end": memory_end,
            "memory_samples": [[moment, rows] for moment, rows in sampler.samples],
            "replicas_at_end": replicas,
            "locust_summary": output[-6000:],
            "records": records,
        }
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    result["conditions_after"] = quiet_machine()
    summary = result["summary"]
    print(f"[{name}] {summary['requests']} requests {summary['statuses']}; 5xx {summary['server_errors']}, "
          f"lost {summary['lost']}; {len(result['kills'])} kills; {result['retries_logged']} retries",
          flush=True)  # fmt: skip
    return result


# ---------------------------------------------------------------------------- rendering


def fmt(value: float | None, unit: str = " s", digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}{unit}"


def memory_table(result: dict[str, Any]) -> list[str]:
    """Per process role: RSS at the start and the end, and the peak of the samples in between."""
    start = {(row["role"], row["pid"]): row for row in result["memory_start"]}
    end = {(row["role"], row["pid"]): row for row in result["memory_end"]}
    peaks: dict[tuple[str, int], float] = {}
    series: dict[tuple[str, int], list[float]] = {}
    for _, rows in result["memory_samples"]:
        for row in rows:
            key = (row["role"], row["pid"])
            peaks[key] = max(peaks.get(key, 0.0), row["rss_mib"])
            series.setdefault(key, []).append(row["rss_mib"])
    lines = [
        "| process | pid | RSS at start | RSS at end | peak sampled | change | of which in the second half |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in sorted(set(start) | set(end)):
        role, pid = key
        before, after = start.get(key), end.get(key)
        change = f"{after['rss_mib'] - before['rss_mib']:+.1f} MiB" if before and after else (
            "killed during the run" if before else "started during the run (a replacement)")
        lines.append(
            f"| {role} | {pid} | {fmt(before and before['rss_mib'], ' MiB', 1)} | "
            f"{fmt(after and after['rss_mib'], ' MiB', 1)} | {fmt(peaks.get(key), ' MiB', 1)} | {change} | "
            f"{second_half(series.get(key, []))} |"
        )
    return lines


def second_half(samples: list[float]) -> str:
    """Growth over the second half of a process' samples: a leak keeps growing, warm-up does not."""
    if len(samples) < 4:
        return "—"
    return f"{samples[-1] - samples[len(samples) // 2]:+.1f} MiB"


def busy_note(result: dict[str, Any]) -> str:
    """Other busy processes seen before and after the run: the machine is shared, latencies depend on it."""
    busy = {
        when: [f"`{' '.join(p['command'].removeprefix('ray::').split())[:70]}` {p['cpu_percent']:.0f} %"
               for p in result[f"conditions_{when}"].get("busy_processes", [])]
        for when in ("before", "after")
    }  # fmt: skip
    if not any(busy.values()):
        return ""
    return (" Busy processes (not this run's) before: " + (", ".join(busy["before"]) or "none")
            + "; after: " + (", ".join(busy["after"]) or "none") + ".")  # fmt: skip


def render_setup(name: str, result: dict[str, Any]) -> list[str]:
    summary, setup = result["summary"], result["setup"]
    kills = result["kills"]
    by_deployment: dict[str, int] = {}
    for kill in kills:
        by_deployment[kill["deployment"]] = by_deployment.get(kill["deployment"], 0) + 1
    mid_call = sum(kill["running_calls"] > 0 for kill in kills)
    statuses = ", ".join(f"{status}: {count}" for status, count in summary["statuses"].items())
    lines = [
        f"## `{name}`: {setup['config']} + {' + '.join(setup['overlays'])}",
        "",
        f"Run {result.get('date', 'as above')}: {result['users']} locust users for "
        f"{result['duration_s'] / 60:.0f} min (think time 0.5–2 s), "
        f"valid requests `{json.dumps(setup['params'])}`; Ray with {json.dumps(result['setup']['ray'])}; "
        f"application up in {result['startup_s']:.0f} s. Load average before / after: "
        f"{result['conditions_before']['load_average']} / {result['conditions_after']['load_average']}."
        + busy_note(result),
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests answered | {summary['requests']} |",
        f"| status codes | {statuses} |",
        f"| **5xx** | **{summary['server_errors']}** |",
        f"| **lost** (no answer, connection error, stream cut) | **{summary['lost']}** |",
        f"| answers other than the request's expected ones | {summary['unexpected_count']} |",
        f"| valid requests answered 200: p50 / p99 | {summary['valid_ok']}: {fmt(summary['p50_s'])} / "
        f"{fmt(summary['p99_s'])} |",
        f"| replicas killed (ray.kill / SIGKILL in turn) | {len(kills)}: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(by_deployment.items()))}; {mid_call} while running a call |",
        f"| model calls sent again by the ingress (its log) | {result['retries_logged']} |",
        "",
        "Answers by request kind:",
        "",
        "| kind | answers |",
        "|---|---|",
    ]
    for kind, counts in summary["by_kind"].items():
        lines.append(f"| {kind} | {', '.join(f'{status}: {count}' for status, count in sorted(counts.items()))} |")
    lines += [
        "",
        "Per key (valid requests; `demo-detail` has a quota of 2 requests per minute, the others none):",
        "",
        "| key | valid requests | 200 | 429 | p50 | p99 |",
        "|---|---|---|---|---|---|",
    ]
    for key, row in summary["keys"].items():
        lines.append(f"| {key} | {row['valid_requests']} | {row['ok']} | {row['refused_429']} | "
                     f"{fmt(row['p50_s'])} | {fmt(row['p99_s'])} |")  # fmt: skip
    lines += ["", "Memory (RSS) of every Ray process of the run:", ""] + memory_table(result) + [""]
    return lines


def render(results: dict[str, Any], out: Path) -> None:
    text = out.read_text() if out.exists() else ""
    marker = "<!-- chaos results -->"
    head = text.split(marker)[0].rstrip() + "\n\n" if marker in text else "# Reliability\n\n"
    lines = [marker, "", f"Measured by `benchmarks/chaos.py` on {results['date']} ({results['machine']}); "
             "re-render from `benchmarks/chaos.json` with `--render-from`.", ""]  # fmt: skip
    for name in ("local", "sim"):
        if name in results:
            lines += render_setup(name, results[name])
    out.write_text(head + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=["local", "sim"])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load per setup")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(20.0, 60.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--users", type=int, help="locust users (default per setup)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "chaos.json")
    parser.add_argument("--render-from", type=Path)
    args = parser.parse_args()
    if args.render_from:
        results = json.loads(args.render_from.read_text())
    else:
        from deployments.runtime_env import apply_offline_env

        apply_offline_env()
        cache = Path(os.environ.setdefault("FACEDETAILER_TEST_CACHE", str(REPO / ".cache" / "tests")))
        os.environ.setdefault("FACEDETAILER_TINY_MODELS", str(cache / "tiny-models"))
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        kept = json.loads(args.json.read_text()) if args.json.exists() else {}  # the other setups' figures
        results = {**kept, "date": time.strftime("%Y-%m-%d"), "machine": machine}
        for name in args.setups:
            results[name] = run_setup(name, args.duration, tuple(args.kill_every), args.users)
            args.json.write_text(json.dumps(results, indent=1))
    render(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
