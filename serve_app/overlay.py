"""Config overlays: serve a config with some values changed, without copying the file.

``facedetailer serve --config configs/gpu.yaml --overlay configs/overlays/simulated-cpu.yaml
--set inpainter.model=sim://sd15-inpainting`` runs ``gpu.yaml``'s graph — the same deployments,
GPU fractions and autoscaling blocks — with what the overlays change:

- ``--overlay FILE`` (repeatable): a partial Serve config, deep-merged into the config.
  Mappings merge key by key, other values replace; ``applications`` entries are matched by
  ``name`` (an overlay may name only the keys it changes). A ``null`` removes a key.
- ``--set PATH=VALUE`` (repeatable, applied after the files): ``PATH`` is dotted and relative to
  the application's ``args`` (``inpainter.model``,
  ``sam.deployment.autoscaling_config.upscale_delay_s``); ``app.…`` addresses the application
  entry (``app.runtime_env.env_vars.OMP_NUM_THREADS``) and ``serve.…`` the file's top level
  (``serve.http_options.port``). ``VALUE`` is read as YAML: ``0.5`` is a number, ``true`` a
  boolean, ``{num_cpus: 1}`` a mapping, ``null`` removes the key, anything else a string.

The result is validated like the file itself (:class:`serve_app.config.AppArgs`), so a
misspelt path fails with the field's name before anything is scheduled. ``facedetailer config``
prints the result, for ``serve deploy`` or a KubeRay ``serveConfigV2``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

APP_SCOPE = "app."
SERVE_SCOPE = "serve."


class OverlayError(ValueError):
    """An overlay or ``--set`` that cannot be applied (says which and why)."""


def deep_merge(base: Any, overlay: Any) -> Any:
    """``overlay`` merged into a copy of ``base``: mappings key by key, applications by name."""
    if not isinstance(base, Mapping) or not isinstance(overlay, Mapping):
        return copy.deepcopy(overlay)
    merged = {key: copy.deepcopy(value) for key, value in base.items()}
    for key, value in overlay.items():
        if value is None:
            merged.pop(key, None)
        elif key == "applications" and isinstance(value, list):
            merged[key] = _merge_applications(merged.get(key) or [], value)
        else:
            merged[key] = deep_merge(merged.get(key), value)
    return merged


def _merge_applications(base: list[Any], overlay: list[Any]) -> list[Any]:
    applications = [copy.deepcopy(application) for application in base]
    for application in overlay:
        if not isinstance(application, Mapping) or "name" not in application:
            raise OverlayError("every entry of an overlay's applications needs a name (to match the config's)")
        for index, existing in enumerate(applications):
            if existing.get("name") == application["name"]:
                applications[index] = deep_merge(existing, application)
                break
        else:
            applications.append(copy.deepcopy(dict(application)))
    return applications


def parse_set(text: str) -> tuple[str, Any]:
    """``PATH=VALUE`` → (path, value read as YAML)."""
    path, separator, raw = text.partition("=")
    path = path.strip()
    if not separator or not path or any(not part for part in path.split(".")):
        raise OverlayError(f"--set expects PATH=VALUE with a dotted PATH, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise OverlayError(f"--set {path}: the value {raw!r} is not valid YAML: {error}") from error
    return path, value


def _application(config: dict[str, Any], app_name: str) -> dict[str, Any]:
    for application in config.get("applications") or []:
        if application.get("name") == app_name:
            return application
    raise OverlayError(f"the config has no application named {app_name!r}")


def apply_set(config: dict[str, Any], path: str, value: Any, app_name: str) -> None:
    """Set (or with ``None`` remove) one dotted path in place; see the module doc for scopes."""
    if path.startswith(SERVE_SCOPE):
        target, keys = config, path.removeprefix(SERVE_SCOPE).split(".")
    elif path.startswith(APP_SCOPE):
        target, keys = _application(config, app_name), path.removeprefix(APP_SCOPE).split(".")
    else:
        application = _application(config, app_name)
        target, keys = application.setdefault("args", {}), path.split(".")
    for depth, key in enumerate(keys[:-1]):
        child = target.get(key)
        if child is None:
            child = target[key] = {}
        if not isinstance(child, dict):
            walked = ".".join(keys[: depth + 1])
            raise OverlayError(f"--set {path}: {walked} is {type(child).__name__}, not a mapping")
        target = child
    if value is None:
        target.pop(keys[-1], None)
    else:
        target[keys[-1]] = value


def load_overlay(path: str | Path) -> dict[str, Any]:
    with open(path) as handle:
        overlay = yaml.safe_load(handle) or {}
    if not isinstance(overlay, dict):
        raise OverlayError(f"{path}: an overlay must be a mapping (a partial Serve config)")
    return overlay


def apply_overlays(
    config: Mapping[str, Any],
    overlay_files: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    app_name: str = "facedetailer",
) -> dict[str, Any]:
    """A new config: ``config`` with the overlay files merged in order, then each ``--set``."""
    result: dict[str, Any] = copy.deepcopy(dict(config))
    for overlay_file in overlay_files:
        result = deep_merge(result, load_overlay(overlay_file))
    for text in sets:
        path, value = parse_set(text)
        apply_set(result, path, value, app_name)
    return result


def validate_config(config: Mapping[str, Any], app_name: str = "facedetailer") -> None:
    """Validate the application's args with the project's models and the file with Ray's schema."""
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config import AppArgs

    ServeDeploySchema.model_validate(dict(config))
    AppArgs.model_validate(_application(dict(config), app_name).get("args") or {})
