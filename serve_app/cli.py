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

    from facedetailer_client import DetailResult, FaceDetailerClient, RetryPolicy, ServiceError

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
                    else:
                        faces.update(1)
                        faces.set_postfix_str(item.status)
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
            else:
                result = event["result"]
        faces.close()
        assert result is not None
        stem = Path(path).stem
        _save(result.images[0], outdir / f"{stem}.png")
        _save(result.masks[0], outdir / f"{stem}.mask.png")
        for index, crop in enumerate(result.per_image[0].cropped_refined):
            _save(crop, outdir / f"{stem}.refined-{index}.png")
        tqdm.write(f"{path}: {len(result.per_image[0].segments)} face(s) → {outdir / (stem + '.png')}")


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
    for component in ("sd", "sd_alt", "controlnet"):  # configs/local-cpu.yaml's checkpoints and ControlNet
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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
