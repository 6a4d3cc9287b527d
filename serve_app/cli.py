"""``facedetailer``: serve the application, detail files through it, run the offline demo, make API keys."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local-cpu.yaml"


def _application(config: dict[str, Any]) -> dict[str, Any]:
    from serve_app.app import APP_NAME

    for application in config.get("applications", []):
        if application.get("name") == APP_NAME:
            return application
    raise SystemExit(f"the config has no application named {APP_NAME!r}")


def load_config(config_path: Path, overlays: Sequence[Path] = (), sets: Sequence[str] = ()) -> dict[str, Any]:
    """A Serve config file with ``--overlay`` files and ``--set`` values applied, validated."""
    from serve_app.app import load_serve_config
    from serve_app.overlay import OverlayError, apply_overlays, validate_config

    try:
        config = apply_overlays(load_serve_config(config_path), overlays, sets)
        validate_config(config)
    except (OverlayError, ValueError) as error:  # pydantic's ValidationError is a ValueError
        raise SystemExit(f"{config_path}: {error}") from error
    return config


def start_serving(
    config_path: Path,
    *,
    port: int | None = None,
    blocking: bool = False,
    join_cluster: bool = True,
    overlays: Sequence[Path] = (),
    sets: Sequence[str] = (),
) -> tuple[Any, int]:
    """Start (or join) Ray, then deploy the application from a Serve config file; return (handle, port).

    ``overlays`` and ``sets`` change the file's values (:mod:`serve_app.overlay`).
    ``join_cluster=False`` always starts a private instance (the demo must not replace or shut
    down an application someone else is running on this machine's cluster).
    """
    import ray
    from ray import serve

    from serve_app.app import APP_NAME, build_app

    config = load_config(config_path, overlays, sets)
    application = _application(config)
    env_vars = {key: str(value) for key, value in application.get("runtime_env", {}).get("env_vars", {}).items()}
    os.environ.update(env_vars)
    if not ray.is_initialized():
        try:
            if not join_cluster:
                raise ConnectionError("asked for a private Ray instance")
            ray.init(address="auto", runtime_env={"env_vars": env_vars}, log_to_driver=False)
            print("joined the running Ray cluster", file=sys.stderr)
        except ConnectionError:
            ray.init(address="local", runtime_env={"env_vars": env_vars}, include_dashboard=False, log_to_driver=False)
            print("started a local Ray instance", file=sys.stderr)
    http = dict(config.get("http_options", {}))
    if port is not None:
        http["port"] = port
    serve.start(http_options=http, proxy_location=config.get("proxy_location"))
    handle = serve.run(
        build_app(application.get("args", {})),
        name=APP_NAME,
        route_prefix=application.get("route_prefix", "/"),
        blocking=blocking,
    )
    return handle, int(http.get("port", 8000))


def _parse_param(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise SystemExit(f"--param expects name=value, got {text!r}")
    name, raw = text.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return name.strip(), value


def _save(array: np.ndarray, path: Path) -> None:
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial" + path.suffix)
    Image.fromarray(array).save(partial, format="PNG")
    os.replace(partial, path)  # never leave a half-written output behind


def side_by_side(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    gap = np.full((before.shape[0], 8, 3), 255, dtype=np.uint8)
    return np.concatenate([before, gap, after], axis=1)


def command_serve(args: argparse.Namespace) -> None:
    start_serving(args.config, port=args.port, blocking=True, overlays=args.overlay, sets=args.set)


def command_config(args: argparse.Namespace) -> None:
    """Print the config with its overlays applied (for ``serve deploy`` or a KubeRay serveConfigV2)."""
    import yaml

    config = load_config(args.config, args.overlay, args.set)
    print(yaml.safe_dump(config, sort_keys=False), end="")


def _request_values(args: argparse.Namespace) -> dict[str, Any]:
    """``--workflow`` values (its FaceDetailer node), overridden by each ``--param``."""
    values: dict[str, Any] = {}
    if args.workflow is not None:
        from facedetailer.workflow import WorkflowError, import_workflow

        try:
            imported = import_workflow(Path(args.workflow).read_text(encoding="utf-8"), args.workflow_node)
        except WorkflowError as error:
            raise SystemExit(f"{args.workflow}: {error}") from error
        values.update(imported.params)
        title = f" ({imported.node_title})" if imported.node_title else ""
        print(f"parameters from FaceDetailer node {imported.node_id}{title} of {args.workflow}", file=sys.stderr)
    values.update(dict(_parse_param(item) for item in args.param))
    return values


def command_detail(args: argparse.Namespace) -> None:
    """Detail files through a running service (``--url``) or the Python handle API, with progress bars."""
    from pydantic import ValidationError

    from facedetailer.params import FaceDetailerParams

    values = _request_values(args)
    try:
        params = FaceDetailerParams.model_validate(values)
    except ValidationError as error:
        raise SystemExit(f"invalid parameters: {error}") from error
    if args.url:
        _detail_over_http(args, values)
    else:
        _detail_through_handle(args, params)


def _detail_over_http(args: argparse.Namespace, values: dict[str, Any]) -> None:
    """The HTTP client (retries on 429/503 honour Retry-After); per-face progress from the stream."""
    import httpx
    from tqdm import tqdm

    from facedetailer_client import DetailResult, FaceDetailerClient, FaceEvent, RetryPolicy, ServiceError, StepProgress

    outdir = Path(args.output)
    retry = RetryPolicy(budget_s=args.retry_budget)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    with FaceDetailerClient(args.url, api_key=args.api_key, timeout=timeout, retry=retry) as client:
        for path in tqdm(args.images, desc="images", unit="image"):
            faces = tqdm(desc=f"{Path(path).name}: faces", unit="face", leave=False)
            result: DetailResult | None = None
            try:
                for item in client.stream(Path(path), values):
                    if isinstance(item, DetailResult):
                        result = item
                    elif isinstance(item, FaceEvent):
                        faces.update(1)
                        faces.set_postfix_str(item.status)
                    elif isinstance(item, StepProgress):
                        eta = f", ~{item.request_eta_s:.0f} s left" if item.request_eta_s is not None else ""
                        faces.set_postfix_str(f"face {item.index}: step {item.done}/{item.total}{eta}")
            except ServiceError as error:
                raise SystemExit(f"{path}: the service answered {error}") from error
            finally:
                faces.close()
            if result is None:
                raise SystemExit(f"{path}: the stream ended without a result")
            stem = Path(path).stem
            _write_bytes(result.image, outdir / f"{stem}.png")
            _write_bytes(result.mask, outdir / f"{stem}.mask.png")
            if result.faces_refined:
                for index, crop in enumerate(result.cropped_refined):
                    _write_bytes(crop, outdir / f"{stem}.refined-{index}.png")
                for index, crop in enumerate(result.cropped_enhanced_alpha):
                    _write_bytes(crop, outdir / f"{stem}.alpha-{index}.png")
            summary = f"{result.faces_detected} face(s), {result.faces_refined} refined"
            tqdm.write(f"{path}: {summary} → {outdir / (stem + '.png')}")


def _write_bytes(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial" + path.suffix)
    partial.write_bytes(data)
    os.replace(partial, path)  # never leave a half-written output behind


def _detail_through_handle(args: argparse.Namespace, params: Any) -> None:
    from tqdm import tqdm

    from deployments.testing.assets import load_rgb

    handle, _ = start_serving(args.config, port=args.port, overlays=args.overlay, sets=args.set)
    outdir = Path(args.output)
    for path in tqdm(args.images, desc="images", unit="image"):
        image = load_rgb(Path(path))
        faces = tqdm(desc=f"{Path(path).name}: faces", unit="face", leave=False)
        result = None
        async_gen = handle.options(stream=True).detail_with_progress.remote(image, params.model_dump())
        for event in async_gen:
            if event["event"] == "face":
                faces.update(1)
                faces.set_postfix_str(event["status"])
            elif event["event"] == "progress":
                eta = event["request_eta_s"]
                faces.set_postfix_str(f"face {event['index']}: step {event['done']}/{event['total']}"
                                      + (f", ~{eta:.0f} s left" if eta is not None else ""))  # fmt: skip
            elif event["event"] == "result":
                result = event["result"]
        faces.close()
        assert result is not None
        stem = Path(path).stem
        _save(result.images[0], outdir / f"{stem}.png")
        _save(result.masks[0], outdir / f"{stem}.mask.png")
        for index, crop in enumerate(result.per_image[0].cropped_refined):
            _save(crop, outdir / f"{stem}.refined-{index}.png")
        tqdm.write(f"{path}: {len(result.per_image[0].segments)} face(s) → {outdir / (stem + '.png')}")


def command_video(args: argparse.Namespace) -> None:
    """Detail a video file (``facedetailer video IN OUT``) over HTTP (``--url``) or the handle API."""
    from pydantic import ValidationError

    from facedetailer.params import FaceDetailerParams
    from facedetailer.video_params import VideoParams, split_video_values

    values, video_values = split_video_values(_request_values(args))
    try:
        FaceDetailerParams.model_validate(values)
        VideoParams.model_validate(video_values)
    except ValidationError as error:
        raise SystemExit(f"invalid parameters: {error}") from error
    source, target = Path(args.input), Path(args.output)
    container = args.container or {".mov": "mov", ".mkv": "mkv"}.get(target.suffix.lower(), "mp4")
    data = source.read_bytes()
    if args.url:
        body = _video_over_http(args, data, {**values, **video_values}, container)
    else:
        body = _video_through_handle(args, data, values, video_values, container)
    _write_bytes(base64.b64decode(body.pop("video")), target)
    tracks = [track for track in body["tracks"] if track["selected"]]
    print(f"{source} → {target}: {body['frames']} frames, {len(tracks)} track(s), {body['faces_refined']} faces "
          f"refined, flicker {body['flicker']:.3f} (1.0 = none added), {body['video_codec']} in {body['container']}"
          f"{', audio copied' if body['audio_copied'] else ''}", file=sys.stderr)
    for track in tracks:
        sizes = ", ".join(f"{s['crop_size'][0]}×{s['crop_size'][1]}" for s in track["segments"])
        skipped = f" ({track['skip_reason']})" if track["skipped"] else ""
        print(f"  track {track['track_id']}: frames {track['first_frame']}–{track['last_frame']}, "
              f"seed {track['seed']}, crop {sizes}{skipped}", file=sys.stderr)


def _video_over_http(args: argparse.Namespace, data: bytes, values: dict[str, Any], container: str) -> dict[str, Any]:
    """POST /v1/detail/video/stream: a progress bar from its events, the result's JSON."""
    import httpx
    from tqdm import tqdm

    from facedetailer_client.sse import SSEDecoder

    url = f"{args.url.rstrip('/')}/v1/detail/video/stream"
    fields = {"params": json.dumps(values)}
    api_key = _api_key(args)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    bar = tqdm(desc=Path(args.input).name, unit="frame")
    try:
        with httpx.Client(timeout=httpx.Timeout(args.timeout, connect=10.0), trust_env=False) as client:
            with client.stream("POST", url, params={"container": container}, data=fields, headers=headers,
                               files={"video": (Path(args.input).name, data)}) as response:
                if response.status_code != 200:
                    response.read()
                    raise SystemExit(f"{args.input}: the service answered {response.status_code}: {response.text}")
                decoder = SSEDecoder()
                for line in response.iter_lines():
                    decoded = decoder.feed(line)
                    if decoded is None:
                        continue
                    event, payload = decoded
                    if event == "progress":
                        bar.total = payload["frames_total"]
                        bar.n = payload["frames_done"]
                        bar.refresh()
                    elif event == "error":
                        raise SystemExit(f"{args.input}: the service answered {payload['status']}: {payload['error']}")
                    elif event == "result":
                        return payload
    finally:
        bar.close()
    raise SystemExit(f"{args.input}: the stream ended without a result")


def _video_through_handle(
    args: argparse.Namespace, data: bytes, values: dict[str, Any], video_values: dict[str, Any], container: str
) -> dict[str, Any]:
    from tqdm import tqdm

    from serve_app.http_adapters.video import video_json

    handle, _ = start_serving(args.config, port=args.port, overlays=args.overlay, sets=args.set)
    bar = tqdm(desc=Path(args.input).name, unit="frame")
    result = None
    stream = handle.options(stream=True).detail_video_with_progress.remote(data, values, video_values, container)
    for event in stream:
        if event["event"] == "progress":
            bar.total = event["frames_total"]
            bar.n = event["frames_done"]
            bar.refresh()
        elif event["event"] == "result":
            result = event["result"]
    bar.close()
    assert result is not None
    return video_json(result)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post_multipart(
    url: str, image_bytes: bytes, fields: dict[str, str], timeout: float, api_key: str | None = None
) -> dict[str, Any]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    body.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
    )
    body.write(image_bytes + f"\r\n--{boundary}--\r\n".encode())
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if api_key:  # a config with auth (e.g. --overlay configs/overlays/auth-demo.yaml)
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body.getvalue(), headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost only
    with opener.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def _decode_png(text: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return np.asarray(image)


def command_demo(args: argparse.Namespace) -> None:
    """Offline end to end: serve local-cpu.yaml, detail a packaged photo over HTTP, write the outputs."""
    import ray
    from ray import serve

    from deployments.runtime_env import apply_offline_env
    from deployments.testing.assets import load_rgb, ultralytics_asset
    from deployments.testing.build_tiny_models import build_component, default_tiny_models_dir

    apply_offline_env()
    started = time.perf_counter()
    print("building the tiny inpainters and ControlNet if missing (random weights: refined faces will be noise)…")
    # configs/local-cpu.yaml's checkpoints (one per model family) and ControlNet
    for component in ("sd", "sd_alt", "controlnet", "sdxl_vpred", "sd3", "flux_dev", "flux_fill"):
        build_component(component, default_tiny_models_dir() / component)
    photo = ultralytics_asset(args.photo)
    port = args.port or _free_port()
    try:
        print(f"serving {args.config} on 127.0.0.1:{port}…")
        start_serving(args.config, port=port, join_cluster=False, overlays=args.overlay, sets=args.set)
        ready = time.perf_counter()
        # LiteMedSAM was trained on box prompts: prompt it with the box alone ("none").
        demo_params = {"use_sam": True, "sam_detection_hint": "none", "steps": args.steps, "seed": args.seed}
        fields = {"params": json.dumps(demo_params)}
        print(f"POST /v1/detail?format=json with {photo.name}…")
        request_start = time.perf_counter()
        result = _post_multipart(
            f"http://127.0.0.1:{port}/v1/detail?format=json", photo.read_bytes(), fields, 900, _api_key(args)
        )
        request_seconds = time.perf_counter() - request_start
    except urllib.error.HTTPError as error:
        raise SystemExit(f"the service answered {error.code}: {error.read().decode(errors='replace')}") from error
    finally:
        serve.shutdown()
        ray.shutdown()
    outdir = Path(args.output)
    before = load_rgb(photo)
    after = _decode_png(result["image"])
    _save(after, outdir / "detailed.png")
    _save(_decode_png(result["mask"]), outdir / "mask.png")
    _save(side_by_side(before, after), outdir / "comparison.png")
    for index, crop in enumerate(result["cropped_refined"]):
        _save(_decode_png(crop), outdir / f"cropped_refined_{index}.png")
    for index, crop in enumerate(result["cropped_enhanced_alpha"]):
        _save(_decode_png(crop), outdir / f"cropped_enhanced_alpha_{index}.png")
    print(f"faces detected: {result['faces_detected']}, refined: {result['faces_refined']}")
    for segment in result["segments"][0]:
        print(f"  face {segment['index']}: bbox {[round(v) for v in segment['bbox']]} conf {segment['confidence']:.2f} "
              f"seed {segment['seed']} upscale {segment['upscale']:.2f} skipped {segment['skipped']}")
    print("stage timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in result["timings"].items()))
    print(f"start-up {ready - started:.1f} s, HTTP request {request_seconds:.2f} s, "
          f"total {time.perf_counter() - started:.1f} s")
    print(f"outputs written to {outdir.resolve()}/ (detailed.png, mask.png, comparison.png, crops)")


def _api_key(args: argparse.Namespace) -> str | None:
    from facedetailer_client import API_KEY_ENV

    return args.api_key or os.environ.get(API_KEY_ENV) or None


def _add_api_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key",
        help="the service's API key (default: $FACEDETAILER_API_KEY; prefer the variable: "
        "a command line is visible to other users of the machine)",
    )


def _key_quotas(args: argparse.Namespace) -> dict[str, Any]:
    quotas = {
        "requests_per_minute": args.requests_per_minute,
        "concurrent_crops": args.concurrent_crops,
        "work_units_per_hour": args.work_units_per_hour,
    }
    return {name: value for name, value in quotas.items() if value is not None}


def command_keys_new(args: argparse.Namespace) -> None:
    """Make a key: the key on stdout (once: it is stored nowhere), its entry (the hash) in ``--file`` or on stderr."""
    import yaml
    from pydantic import ValidationError

    from serve_app.auth.keys import key_entry, new_key

    key = sys.stdin.readline().strip() if args.key_from_stdin else new_key()
    if not key:
        raise SystemExit("--key-from-stdin: no key on standard input")
    fields: dict[str, Any] = {"quotas": _key_quotas(args)} if _key_quotas(args) else {}
    if args.weight is not None:
        fields["weight"] = args.weight
    try:
        entry = key_entry(args.id, key, args.scopes, **fields)
    except ValidationError as error:
        raise SystemExit(f"invalid key: {error}") from error
    if args.file is not None:
        _change_key_file(args.file, lambda keys: [*keys, entry])
        print(f"added key {args.id!r} to {args.file} (a running service accepts it within its reload interval)",
              file=sys.stderr)  # fmt: skip
    else:
        print(yaml.safe_dump([entry], sort_keys=False), end="", file=sys.stdout if args.key_from_stdin else sys.stderr)
    if not args.key_from_stdin:
        print(key)


def command_keys_remove(args: argparse.Namespace) -> None:
    """Remove a key from a key file (a running service refuses it within its reload interval)."""

    def without(keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not any(key["id"] == args.id for key in keys):
            raise SystemExit(f"{args.file}: no key {args.id!r}")
        return [key for key in keys if key["id"] != args.id]

    _change_key_file(args.file, without)
    print(f"removed key {args.id!r} from {args.file}", file=sys.stderr)


def _change_key_file(path: Path, change: Any) -> None:
    """Read a key file (none yet: no keys), change its entries, check and write it whole, swapped in at once:
    a service re-reading it never sees half of it."""
    import yaml

    from serve_app.auth.keys import KeyFileError, entry_of, parse_key_file

    try:
        keys = parse_key_file(path.read_text(encoding="utf-8"), str(path)) if path.exists() else []
        entries = change([entry_of(key) for key in keys])
        text = yaml.safe_dump({"keys": entries}, sort_keys=False)
        parse_key_file(text, str(path))  # e.g. a second key with the same id
    except (OSError, KeyFileError) as error:
        raise SystemExit(str(error)) from error
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.chmod(partial, 0o600)
    os.replace(partial, path)


def command_batch(args: argparse.Namespace) -> None:
    """A bulk job on Ray Data (serve_app/batch): exit 0 when every input is done, 1 when some failed, 2 when
    the job cannot start."""
    from serve_app.batch import BatchConfigError, run_batch

    try:
        summary = run_batch(
            args.input,
            args.output,
            config=args.config,
            overlays=args.overlay,
            sets=args.set,
            params=dict(_parse_param(item) for item in args.param),
            params_file=args.params,
            workflow=args.workflow,
            workflow_node=args.workflow_node,
            resume=args.resume,
            outputs=args.outputs,
            address=args.address,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except BatchConfigError as error:
        print(f"facedetailer batch: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    for line in summary.lines():
        print(line)
    raise SystemExit(summary.exit_code)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="a Serve config file")
    parser.add_argument(
        "--overlay", type=Path, action="append", default=[], metavar="FILE",
        help="a partial Serve config merged into --config (repeatable)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE",
        help="change one value, e.g. inpainter.model=sim://sd15-inpainting (repeatable; see docs/configuration.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facedetailer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve the application from a Serve config")
    _add_config_arguments(serve_parser)
    serve_parser.add_argument("--port", type=int)
    serve_parser.set_defaults(run=command_serve)
    config_parser = commands.add_parser("config", help="print a Serve config with its overlays applied")
    _add_config_arguments(config_parser)
    config_parser.set_defaults(run=command_config)
    detail = commands.add_parser("detail", help="detail image files through the service")
    detail.add_argument("images", nargs="+")
    detail.add_argument("-o", "--output", required=True)
    detail.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    detail.add_argument("--workflow", type=Path, help="a ComfyUI workflow .json: its FaceDetailer node's values")
    detail.add_argument("--workflow-node", help="the FaceDetailer node id, when the workflow has several")
    detail.add_argument("--url", help="a running service (http://host:port); default: serve --config here")
    detail.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for one answer (--url)")
    detail.add_argument("--retry-budget", type=float, default=120.0, help="seconds of 429/503 retries (--url)")
    _add_api_key_argument(detail)
    _add_config_arguments(detail)
    detail.add_argument("--port", type=int)
    detail.set_defaults(run=command_detail)
    video = commands.add_parser("video", help="detail the faces of a video file (steady tracks, audio kept)")
    video.add_argument("input", help="a video file (mp4, mov, mkv, webm, …)")
    video.add_argument("output", help="the detailed video (.mp4, .mov or .mkv; see --container)")
    video.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="a FaceDetailer parameter or a video option (temporal, pick_tracks, track_ids, …)")
    video.add_argument("--workflow", type=Path, help="a ComfyUI workflow .json: its FaceDetailer node's values")
    video.add_argument("--workflow-node", help="the FaceDetailer node id, when the workflow has several")
    video.add_argument("--container", choices=["mp4", "mov", "mkv"], help="default: from OUTPUT's suffix, else mp4")
    video.add_argument("--url", help="a running service (http://host:port); default: serve --config here")
    _add_api_key_argument(video)
    video.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the answer (--url)")
    _add_config_arguments(video)
    video.add_argument("--port", type=int)
    video.set_defaults(run=command_video)
    _add_batch_parser(commands)
    demo = commands.add_parser("demo", help="offline demo on a photo shipped by ultralytics")
    _add_config_arguments(demo)
    demo.add_argument("--photo", default="zidane.jpg")
    demo.add_argument("--output", default="demo-output")
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--port", type=int)
    _add_api_key_argument(demo)
    demo.set_defaults(run=command_demo)
    keys = commands.add_parser("keys", help="API keys for a service with args.auth (docs/auth.md)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new = key_commands.add_parser("new", help="make a key: prints the key once and its entry (the hash)")
    new.add_argument("--id", required=True, help="the key's name (logs, /v1/stats, the fair queue)")
    new.add_argument("--scopes", nargs="+", required=True, choices=["detail", "admin"])
    new.add_argument("--requests-per-minute", type=int)
    new.add_argument("--concurrent-crops", type=int)
    new.add_argument("--work-units-per-hour", type=float)
    new.add_argument("--weight", type=float, help="share of the inpainter relative to other keys (default 1)")
    new.add_argument("--file", type=Path, help="add the entry to this key file (written atomically)")
    new.add_argument("--key-from-stdin", action="store_true", help="hash a key read from standard input instead")
    new.set_defaults(run=command_keys_new)
    remove = key_commands.add_parser("remove", help="remove a key from a key file (rotation)")
    remove.add_argument("--id", required=True)
    remove.add_argument("--file", type=Path, required=True)
    remove.set_defaults(run=command_keys_remove)
    return parser


def _add_batch_parser(commands: Any) -> None:
    batch = commands.add_parser(
        "batch",
        help="detail every image of a folder, glob, list or bucket on Ray Data (resumable; docs/batch.md)",
        description="INPUT: a folder, a glob, a .txt/.parquet list of paths, or a URI (s3://…); OUTPUT: a folder "
        "or URI. Writes OUTPUT/manifest.parquet (one row per input). Exit status: 0 every input done, 1 some "
        "failed (see the manifest), 2 the job cannot start.",
    )
    batch.add_argument("input")
    batch.add_argument("output")
    batch.add_argument("--params", type=Path, metavar="FILE", help="a JSON object of FaceDetailer parameters")
    batch.add_argument("--workflow", type=Path, help="a ComfyUI workflow .json: its FaceDetailer node's values")
    batch.add_argument("--workflow-node", help="the FaceDetailer node id, when the workflow has several")
    batch.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="one parameter (repeatable)")
    batch.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, default=True,
        help="skip inputs the manifest has (default); --no-resume starts over",
    )
    batch.add_argument("--outputs", default="image", help="comma-separated: image, mask, crops, json (default image)")
    batch.add_argument(
        "--address", help="Ray cluster (auto, ray://host:10001, host:port); default: RAY_ADDRESS, else a local instance"
    )
    batch.add_argument("--batch-size", type=int, default=4, help="images per Ray Data batch in the model stages")
    batch.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    _add_config_arguments(batch)
    batch.set_defaults(run=command_batch)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
