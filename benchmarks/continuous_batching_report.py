"""The continuous batching benchmark's report: summaries of saved runs and the docs section.

``benchmarks/continuous_batching.py render`` writes the "Continuous batching" section of
``docs/benchmarks.md`` from the JSON its measuring modes saved; nothing here measures.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

SECTION = "## Continuous batching"
QUIET_CPU_S = 0.05  # a sample is undisturbed when other processes took at most this much CPU during it


# ------------------------------------------------------------------------------------ single-request summaries


def _quartiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"median": median, "q1": q1, "q3": q3, "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def summarise_single(run: dict[str, Any]) -> dict[str, Any]:
    """Medians, fastest, and the per-pair ratios / stage differences of a ``single`` run's samples."""
    samples = run["samples"]
    walls = {name: [sample["wall"] for sample in values] for name, values in samples.items()}
    run["medians"] = {name: statistics.median(values) for name, values in walls.items()}
    run["fastest"] = {name: min(values) for name, values in walls.items()}
    run["ratios"] = {name: run["medians"][name] / run["medians"]["in-process"] for name in walls}
    run["fastest_ratios"] = {name: run["fastest"][name] / run["fastest"]["in-process"] for name in walls}
    local = samples["in-process"]
    pairs: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    for name in ("handle", "http-png"):
        ratios = [served["wall"] / alone["wall"] for served, alone in zip(samples[name], local, strict=True)]
        pairs[name] = _quartiles(ratios)
    for name, values in samples.items():
        keys = sorted({key for sample in values for key in sample["timings"]} | {"unet_s", "wall", *DERIVED_STAGES})
        per_stage = {}
        for key in keys:
            series = [_stage(sample, key) for sample in values]
            if all(value is None for value in series):
                continue
            entry: dict[str, Any] = {"value": _quartiles([v for v in series if v is not None])}
            if name != "in-process":
                diffs = [served - alone for served, alone in zip(series, (_stage(x, key) for x in local), strict=True)
                         if served is not None and alone is not None]  # fmt: skip
                if diffs:
                    entry["minus_in_process"] = _quartiles(diffs)
            per_stage[key] = entry
        stages[name] = per_stage
    run["pair_ratios"] = pairs
    run["stages"] = stages
    # the same ratios over the repetitions in which no other process took CPU time (undisturbed pairs)
    limit = run.get("quiet_cpu_s", QUIET_CPU_S)
    quiet = [index for index in range(len(local))
             if all(samples[name][index].get("foreign_cpu_s", 0.0) <= limit for name in samples)]  # fmt: skip
    run["quiet_repetitions"] = quiet
    run["quiet_pair_ratios"] = {
        name: _quartiles([samples[name][i]["wall"] / local[i]["wall"] for i in quiet]) if quiet else None
        for name in ("handle", "http-png")
    }
    run["foreign_cpu_s"] = {name: _quartiles([s.get("foreign_cpu_s", 0.0) for s in values])
                            for name, values in samples.items()}  # fmt: skip
    # what serving adds beyond the UNet: (wall − UNet seconds) served − the same in-process, per pair
    run["beyond_unet_minus_in_process"] = {
        name: _quartiles([(s["wall"] - s["unet_s"]) - (alone["wall"] - alone["unet_s"])
                          for s, alone in zip(samples[name], local, strict=True)])
        for name in ("handle", "http-png")
    }  # fmt: skip
    run["unet_ratios"] = {name: _quartiles([s["unet_s"] / alone["unet_s"] for s, alone in zip(samples[name], local,
                                            strict=True)]) for name in ("handle", "http-png")}  # fmt: skip
    return run


DERIVED_STAGES = {  # name: (minuend, subtrahend), both stage keys
    "inpaint_hop": ("inpaint", "inpaint_engine"),  # handle call, object store, replica, thread hand-offs
    "engine_beyond_unet": ("inpaint_engine", "unet_s"),  # VAE, text, sampler arithmetic, engine bookkeeping
    "outside_pipeline": ("wall", "pipeline"),  # ingress decode/encode, HTTP or the handle's result transfer
}


def _stage(sample: dict[str, Any], key: str) -> float | None:
    if key in DERIVED_STAGES:
        first, second = (_stage(sample, part) for part in DERIVED_STAGES[key])
        return None if first is None or second is None else first - second
    if key in ("wall", "unet_s"):
        return sample[key]
    return sample["timings"].get(key)


# ------------------------------------------------------------------------------------ render


def _by(
    runs: list[dict[str, Any]], benchmark: str, model: str | None, path: str, device: str | None = None,
    vae: bool = False,
) -> dict[str, Any] | None:
    """The first run of ``benchmark`` on ``model`` and code ``path`` (and ``sim://`` device mode, if given),
    with a costed ``sim://`` VAE or (the default) a free one."""
    for run in runs:
        if run["benchmark"] == benchmark and run["code"]["path"] == path and run.get("model") == model:
            if (device is None or _device(run) == device) and _vae_costed(run) == vae:
                return run
    return None


def _vae_costed(run: dict[str, Any]) -> bool:
    """Whether a sim run gave the VAE its published costs (``vae_encode`` / ``vae_decode``; before: free)."""
    cost = run.get("cost") or {}
    return bool(cost.get("vae_encode") or cost.get("vae_decode"))


def _device(run: dict[str, Any]) -> str | None:
    """A sim run's device model; runs from before the asynchronous device had the synchronous one."""
    if run.get("model") != "sim":
        return None
    return run.get("device") or "sync"


def sim_device(sync: bool) -> str:
    """The ``sim://`` device model this run measures (code without the asynchronous model is synchronous)."""
    from deployments import simulated

    return "sync" if sync or not hasattr(simulated.SimulatedAccelerator, "synchronize") else "async"


def _merged_single(runs: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
    """All ``single`` runs of one code path as one: samples pooled, medians and fastest recomputed."""
    chosen = [run for run in runs if run["benchmark"] == "single" and run["code"]["path"] == path]
    if not chosen:
        return None
    samples: dict[str, list[Any]] = {}
    for run in chosen:
        for name, values in run["samples"].items():
            samples.setdefault(name, []).extend(values)
    if all(isinstance(value, dict) for values in samples.values() for value in values):  # per-sample records
        merged = summarise_single({"benchmark": "single", "samples": samples})
        return {**merged, "code": chosen[-1]["code"], "runs": len(chosen), "started": [r["started"] for r in chosen],
                "machine": [r["machine"] for r in chosen]}  # fmt: skip
    medians = {name: statistics.median(values) for name, values in samples.items()}
    fastest = {name: min(values) for name, values in samples.items()}
    return {"benchmark": "single", "code": chosen[0]["code"], "samples": samples, "medians": medians,
            "fastest": fastest, "runs": len(chosen),
            "ratios": {name: medians[name] / medians["in-process"] for name in medians},
            "fastest_ratios": {name: fastest[name] / fastest["in-process"] for name in fastest}}  # fmt: skip


def _level(run: dict[str, Any] | None, clients: int) -> dict[str, Any] | None:
    if run is None:
        return None
    return next((level for level in run["levels"] if level["clients"] == clients), None)


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def _iqr(stats: dict[str, float] | None, pattern: str, scale: float = 1.0) -> str:
    if not stats:
        return "—"
    median, q1, q3 = (pattern.format(stats[key] * scale) for key in ("median", "q1", "q3"))
    return f"{median} ({q1} – {q3})"


STAGE_ROWS = (
    ("decode", "decode (multipart + PNG decode, ingress)"),
    ("detect", "detect (served: + the detector hop)"),
    ("inpaint", "inpaint (served: + the inpainter hop)"),
    ("inpaint_hop", "… the hop: inpaint − engine (Ray call, object store, replica, thread hand-offs)"),
    ("inpaint_engine", "… in the inpainter's engine (submit → crops decoded)"),
    ("unet_s", "… … UNet calls"),
    ("engine_beyond_unet", "… … beyond the UNet (VAE, text, sampler, bookkeeping)"),
    ("blend", "blend"),
    ("pipeline", "pipeline (the whole cycle)"),
    ("encode", "encode (PNG, ingress)"),
    ("outside_pipeline", "wall − pipeline (decode, encode, HTTP/proxy or the handle's result transfer)"),
    ("wall", "**client wall time**"),
)


def single_stage_table(run: dict[str, Any]) -> list[str]:
    """Stage times in ms, median (IQR); served − in-process per pair."""
    stages = run["stages"]
    lines = [f"Per stage ({len(run['samples']['in-process'])} repetitions; ms, median (interquartile range); "
             "served − in-process is taken per pair, then the median):", "",
             "| stage | in-process | handle | handle − in-process | HTTP PNG | HTTP − in-process |",
             "|---|---|---|---|---|---|"]  # fmt: skip

    def cell(path: str, key: str, kind: str = "value") -> str:
        entry = stages.get(path, {}).get(key)
        return _iqr(entry.get(kind) if entry else None, "{:.1f}", 1000)

    for key, label in STAGE_ROWS:
        lines.append(
            f"| {label} | {cell('in-process', key)} | {cell('handle', key)} "
            f"| {cell('handle', key, 'minus_in_process')} | {cell('http-png', key)} "
            f"| {cell('http-png', key, 'minus_in_process')} |"
        )
    beyond, unet = run.get("beyond_unet_minus_in_process", {}), run.get("unet_ratios", {})
    lines += [
        f"| wall − UNet, served − in-process | | | {_iqr(beyond.get('handle'), '{:.1f}', 1000)} | "
        f"| {_iqr(beyond.get('http-png'), '{:.1f}', 1000)} |",
        f"| UNet seconds, served ÷ in-process | | | {_iqr(unet.get('handle'), '{:.3f}')} | "
        f"| {_iqr(unet.get('http-png'), '{:.3f}')} |",
        "",
    ]
    quiet = run.get("quiet_pair_ratios") or {}
    if quiet.get("handle"):
        lines += [
            f"Repetitions in which no process outside the benchmark's tree took more than {QUIET_CPU_S} CPU-s "
            f"during any of its three samples: {len(run['quiet_repetitions'])} of "
            f"{len(run['samples']['in-process'])}; per-pair ratio over those: handle "
            f"{_iqr(quiet['handle'], '{:.3f}')}, HTTP {_iqr(quiet['http-png'], '{:.3f}')}.",
            "",
        ]
    return lines


def render(files: list[Path], notes: Path | None = None) -> str:
    runs = [json.loads(path.read_text()) for path in files]
    lines = [SECTION, ""]
    lines += [
        "Issue 9, part 7: the inpainter's step-level engine next to the `@serve.batch` path it replaced "
        "(measured from the last commit before the engine, `3e21882`, plus the `sim://` commit), by "
        "`benchmarks/continuous_batching.py` (see `benchmarks/README.md`). Raw numbers: "
        "`benchmarks/continuous_batching/*.json`.",
        "",
    ]
    # the engine on the asynchronous sim:// device (the default); the old path only ever had the synchronous one
    sim_new = _by(runs, "clients", "sim", "engine", "async") or _by(runs, "clients", "sim", "engine")
    sim_old = _by(runs, "clients", "sim", "serve.batch")
    sim_sync = _by(runs, "clients", "sim", "engine", "sync") if _device(sim_new or {}) == "async" else None
    single_new, single_old = _merged_single(runs, "engine"), _merged_single(runs, "serve.batch")
    eight_new, eight_old = _level(sim_new, 8), _level(sim_old, 8)
    lone_new, lone_old = _level(sim_new, 1), _level(sim_old, 1)

    def efficiency(level: dict[str, Any] | None) -> float | None:
        return level["cost_model"]["work_efficiency"] if level else None

    def mean_batch(level: dict[str, Any] | None) -> float | None:
        return level["unet"]["mean_batch"] if level else None

    def lone(level: dict[str, Any] | None, key: str) -> float | None:
        if not level or key not in level["cost_model"]:
            return None
        return level["cost_model"][key]["p50"] * 1000

    def ratio(run: dict[str, Any] | None, path: str, kind: str = "ratios") -> float | None:
        return run[kind][path] if run else None

    lone_in_new = _by(runs, "lone", "sim", "engine", "async") or _by(runs, "lone", "sim", "engine")
    lone_in_old = _by(runs, "lone", "sim", "serve.batch")
    lone_in_sync = _by(runs, "lone", "sim", "engine", "sync") if _device(lone_in_new or {}) == "async" else None
    lone_sync = _level(sim_sync, 1)

    def in_process(run: dict[str, Any] | None, key: str) -> float | None:
        return run[key]["p50"] * 1000 if run else None

    # the same targets with the VAE at its published cost (docs/simulated.md): model time = UNet + VAE
    lone_in_vae = _by(runs, "lone", "sim", "engine", "async", vae=True)
    sim_vae = _by(runs, "clients", "sim", "engine", "async", vae=True)
    lone_vae, eight_vae = _level(sim_vae, 1), _level(sim_vae, 8)
    roundtrip = next((run for run in runs if run["benchmark"] == "serve_roundtrip"), None)

    lines += [
        "### Targets",
        "",
        "| target | engine | `@serve.batch` (before) | met |",
        "|---|---|---|---|",
    ]
    if _device(sim_new or {}) == "async":
        lines[-2:-2] = [
            "The engine's sim figures are on the asynchronous `sim://` device (the default: the host runs one "
            "call ahead, as on a CUDA stream); the `@serve.batch` column was measured on the synchronous one "
            "(its code has no other), as is the `sync=1` row.",
            "",
        ]
    lines += [
        f"| sim, 8 clients, mixed settings: UNet work ≥ 0.85 × the cost model's ideal at batch 8 "
        f"| {_fmt(efficiency(eight_new), '{:.2f}')} | {_fmt(efficiency(eight_old), '{:.2f}')} "
        f"| {'yes' if (efficiency(eight_new) or 0) >= 0.85 else 'no'} |",
        f"| sim, 8 clients: mean UNet batch ≥ 6 crops | {_fmt(mean_batch(eight_new), '{:.2f}')} "
        f"| {_fmt(mean_batch(eight_old), '{:.2f}')} | {'yes' if (mean_batch(eight_new) or 0) >= 6 else 'no'} |",
        f"| sim (the VAE free, the default), a lone crop: latency ≤ its model time + 5 ms (p50 of latency − "
        f"modelled UNet time) "
        f"| +{_fmt(lone(lone_new, 'latency_minus_model_time_s'), '{:.1f}')} ms "
        f"| +{_fmt(lone(lone_old, 'latency_minus_model_time_s'), '{:.1f}')} ms "
        f"| {'yes' if (lone(lone_new, 'latency_minus_model_time_s') or 99) <= 5 else 'no'} |",
        f"| … the same, beyond everything the simulated device ran for it (UNet, VAE, text stand-ins) "
        f"| +{_fmt(lone(lone_new, 'latency_minus_device_busy_s'), '{:.1f}')} ms "
        f"| +{_fmt(lone(lone_old, 'latency_minus_device_busy_s'), '{:.1f}')} ms | |",
        f"| … in-process (no Ray hop), latency − modelled UNet time "
        f"| +{_fmt(in_process(lone_in_new, 'latency_minus_model_time_s'), '{:.1f}')} ms "
        f"| +{_fmt(in_process(lone_in_old, 'latency_minus_model_time_s'), '{:.1f}')} ms "
        f"| {'yes' if (in_process(lone_in_new, 'latency_minus_model_time_s') or 99) <= 5 else 'no'} |",
        f"| … in-process, beyond the device's busy time "
        f"| +{_fmt(in_process(lone_in_new, 'latency_minus_device_busy_s'), '{:.1f}')} ms "
        f"| +{_fmt(in_process(lone_in_old, 'latency_minus_device_busy_s'), '{:.1f}')} ms | |",
    ]
    if lone_in_vae or sim_vae:
        hop = replica = None
        if lone_vae:
            hop = statistics.median(r["latency"] - r["replica_s"] for r in lone_vae["records"]) * 1000
            replica = statistics.median(r["replica_s"] - r["device_busy_s"] for r in lone_vae["records"]) * 1000
        empty = roundtrip["round_trip_ms"]["empty"]["p50"] if roundtrip else None
        job = roundtrip["round_trip_ms"]["crop_job"]["p50"] if roundtrip else None
        within = (in_process(lone_in_vae, "latency_minus_device_busy_s") or 99) <= 5
        lines += [
            f"| sim with the VAE at its published cost (encode 15 ms, decode 31 ms per 512² crop), a lone crop "
            f"in-process: latency ≤ its model time (UNet + VAE) + 5 ms "
            f"| +{_fmt(in_process(lone_in_vae, 'latency_minus_device_busy_s'), '{:.1f}')} ms | — "
            f"| {'yes' if within else 'no'} |",
            f"| … served, 1 client: latency − (UNet + VAE) = Ray's round trip + the replica's share "
            f"| +{_fmt(lone(lone_vae, 'latency_minus_device_busy_s'), '{:.1f}')} ms = {_fmt(hop, '{:.1f}')} "
            f"+ {_fmt(replica, '{:.1f}')} ms | — | no: an empty Serve handle call alone takes "
            f"{_fmt(empty, '{:.1f}')} ms here, the crop's job {_fmt(job, '{:.1f}')} ms |",
            f"| … 8 clients: device work ÷ ideal at batch 8 / mean UNet batch "
            f"| {_fmt(efficiency(eight_vae), '{:.2f}')} / {_fmt(mean_batch(eight_vae), '{:.2f}')} | — "
            f"| {'yes' if (efficiency(eight_vae) or 0) >= 0.85 and (mean_batch(eight_vae) or 0) >= 6 else 'no'} |",
        ]
    if lone_in_sync or lone_sync:
        lines += [
            f"| … on the synchronous device (`sync=1`, the model before): served / in-process, latency − "
            f"modelled UNet time | +{_fmt(lone(lone_sync, 'latency_minus_model_time_s'), '{:.1f}')} ms / "
            f"+{_fmt(in_process(lone_in_sync, 'latency_minus_model_time_s'), '{:.1f}')} ms | | |",
        ]
    lines += [
        f"| CPU: one request served ≤ 1.05 × in-process, medians (handle / HTTP PNG) "
        f"| {_fmt(ratio(single_new, 'handle'), '{:.3f}')} / {_fmt(ratio(single_new, 'http-png'), '{:.3f}')} "
        f"| {_fmt(ratio(single_old, 'handle'), '{:.3f}')} / {_fmt(ratio(single_old, 'http-png'), '{:.3f}')} "
        f"| {'yes' if max(ratio(single_new, 'handle') or 9, ratio(single_new, 'http-png') or 9) <= 1.05 else 'no'} "
        "|",
        f"| … fastest samples (handle / HTTP PNG) "
        f"| {_fmt(ratio(single_new, 'handle', 'fastest_ratios'), '{:.3f}')} / "
        f"{_fmt(ratio(single_new, 'http-png', 'fastest_ratios'), '{:.3f}')} "
        f"| {_fmt(ratio(single_old, 'handle', 'fastest_ratios'), '{:.3f}')} / "
        f"{_fmt(ratio(single_old, 'http-png', 'fastest_ratios'), '{:.3f}')} | |",
        f"| … per pair, median (IQR): handle / HTTP PNG "
        f"| {_iqr((single_new or {}).get('pair_ratios', {}).get('handle'), '{:.3f}')} / "
        f"{_iqr((single_new or {}).get('pair_ratios', {}).get('http-png'), '{:.3f}')} | — | |",
        "",
    ]
    if notes is not None and notes.exists():
        lines += [notes.read_text().strip(), ""]
    for run in sorted(
        (run for run in runs if run["benchmark"] == "clients"),
        key=lambda run: (run["model"], run["code"]["path"] != "serve.batch"),
    ):
        code = run["code"]
        device = f" ({_device(run)} device)" if _device(run) else ""
        device += ", the VAE at its published cost" if _vae_costed(run) else ""
        lines += [f"### {run['model'].upper()}, {code['path']} path{device}", ""]
        options = run["options"]
        lines.append(
            f"Model `{run['model_reference']}`, {run['size']}×{run['size']} crops, one per request, "
            f"`max_batch_size` {run['max_batch_size']}, replica `OMP_NUM_THREADS={options['threads']}`; "
            f"client k starts {options['stagger']} s after client k − 1; each level is measured over "
            f"{options['duration']:.0f} s with all its clients running ({run['started']})."
        )
        lines.append("")
        header = (
            "| clients | req/s | × sequential | p50 latency | p99 latency | queue wait p50 | mean UNet batch "
            "| UNet calls by crops (crops×calls) |"
        )
        separator = "|---|---|---|---|---|---|---|---|"
        if run.get("cost"):
            header += " UNet work ÷ ideal at batch 8 |"
            separator += "---|"
        lines += [header, separator]
        sequential = run["levels"][0]["throughput_rps"]
        for level in run["levels"]:
            sizes = ", ".join(f"{size}×{count}" for size, count in level["unet"]["unet_batch_sizes"].items())
            row = (
                f"| {level['clients']} | {level['throughput_rps']:.3f} | {level['throughput_rps'] / sequential:.2f}× "
                f"| {level['latency_p50_s']:.2f} s | {level['latency_p99_s']:.2f} s "
                f"| {_fmt(level['queue_wait_p50_s'], '{:.3f} s')} | {level['unet']['mean_batch']:.2f} | {sizes} |"
            )
            if run.get("cost"):
                row += f" {level['cost_model']['work_efficiency']:.2f} |"
            lines.append(row)
        lines.append("")
    singles = [run for run in (single_old, single_new) if run is not None]
    if singles:
        lines += ["### One request served vs in-process (CPU, `configs/local-cpu.yaml`)", "",
                  "Median (fastest) of all repetitions, in-process and served interleaved; astronaut.png, 20 steps. "
                  "Per pair: each served sample ÷ the in-process sample of the same repetition, median "
                  "(interquartile range).",
                  "",
                  "| code | runs, repetitions | in-process | handle | HTTP PNG | handle ÷ in-process "
                  "| HTTP ÷ in-process | per pair: handle | per pair: HTTP |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for run in singles:
            m, f, r, fr = run["medians"], run["fastest"], run["ratios"], run["fastest_ratios"]
            pairs = run.get("pair_ratios", {})
            lines.append(
                f"| {run['code']['path']} | {run['runs']}, {len(run['samples']['handle'])} "
                f"| {m['in-process']:.3f} ({f['in-process']:.3f}) s | {m['handle']:.3f} ({f['handle']:.3f}) s "
                f"| {m['http-png']:.3f} ({f['http-png']:.3f}) s | {r['handle']:.3f} ({fr['handle']:.3f}) "
                f"| {r['http-png']:.3f} ({fr['http-png']:.3f}) | {_iqr(pairs.get('handle'), '{:.3f}')} "
                f"| {_iqr(pairs.get('http-png'), '{:.3f}')} |"
            )
        lines.append("")
    if single_new is not None and "stages" in single_new:
        lines += single_stage_table(single_new)
    return "\n".join(lines)


def write_section(out: Path, section: str) -> None:
    """Replace (or append) the "Continuous batching" section of ``out``."""
    text = out.read_text() if out.exists() else ""
    if SECTION in text:
        before, rest = text.split(SECTION, 1)
        following = rest.find("\n## ")
        after = rest[following + 1 :] if following >= 0 else ""
        text = before + section + ("\n" + after if after else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.write_text(text)
