"""Build the small, randomly initialised models the tests and the offline demo load.

Each model has the real architecture and is saved in the format real weights come in, so the
deployments load it through their production loading code. Usage::

    python -m deployments.testing.build_tiny_models DIR

Each component (``yolo``, ``sam``, ``sd``, ``sd_alt``, ``controlnet``, and the other families'
``sdxl_vpred``, ``sd3``, ``flux_dev``, ``flux_schnell``, ``flux_fill``) is built into its own
sub-folder, once: a finished build leaves ``manifest.json``, written last after an atomic
rename, so an interrupted build is redone rather than half-used.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUILD_VERSION = 2
MANIFEST = "manifest.json"
ROOT_PLACEHOLDER = "{root}"
# component name -> "module:function"; the function builds into an empty folder and returns
# a JSON-able dict of what it wrote (absolute paths inside that folder).
BUILDERS: dict[str, str] = {
    "yolo": "deployments.testing.tiny_yolo:build_tiny_yolo",
    "sam": "deployments.testing.tiny_sam:build_tiny_sam",
    "sd": "deployments.testing.tiny_sd:build_tiny_sd",
    "sd_alt": "deployments.testing.tiny_sd:build_tiny_sd_alt",  # other weights: a second checkpoint
    "controlnet": "deployments.testing.tiny_controlnet:build_tiny_controlnet",  # needs "sd" (built first)
    # the other model families (docs/models.md)
    "sdxl_vpred": "deployments.testing.tiny_families:build_tiny_sdxl_vpred",
    "sd3": "deployments.testing.tiny_families:build_tiny_sd3",
    "flux_dev": "deployments.testing.tiny_families:build_tiny_flux_dev",
    "flux_schnell": "deployments.testing.tiny_families:build_tiny_flux_schnell",
    "flux_fill": "deployments.testing.tiny_families:build_tiny_flux_fill",
}


def default_tiny_models_dir() -> Path:
    """Where ``tiny://`` references are built: $FACEDETAILER_TINY_MODELS or the user cache."""
    configured = os.environ.get("FACEDETAILER_TINY_MODELS")
    if configured:
        return Path(configured)
    return Path(os.environ.get("FACEDETAILER_CACHE", Path.home() / ".cache" / "facedetailer")) / "tiny-models"


def _builder(component: str) -> Callable[[Path], dict[str, Any]]:
    module_name, function_name = BUILDERS[component].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def _relocate(value: Any, old: str, new: str) -> Any:
    return json.loads(json.dumps(value).replace(old, new))


def build_component(component: str, directory: Path) -> dict[str, Any]:
    """Build one component into ``directory`` unless a finished build is there; return its paths."""
    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (test workers, Ray replicas) may ask at once: build under a lock.
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest_path = directory / MANIFEST
        if manifest_path.is_file():
            stored = json.loads(manifest_path.read_text())
            if stored.get("version") == BUILD_VERSION:
                return _relocate(stored["paths"], ROOT_PLACEHOLDER, str(directory))
        return _build_unlocked(component, directory)


def _build_unlocked(component: str, directory: Path) -> dict[str, Any]:
    staging = Path(tempfile.mkdtemp(prefix=f".{component}-building-", dir=directory.parent))
    try:
        paths = _builder(component)(staging)
        stored = {"version": BUILD_VERSION, "paths": _relocate(paths, str(staging), ROOT_PLACEHOLDER)}
        (staging / MANIFEST).write_text(json.dumps(stored, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _relocate(stored["paths"], ROOT_PLACEHOLDER, str(directory))


def build_all(directory: Path) -> dict[str, dict[str, Any]]:
    """Build every component under ``directory``; return ``{component: paths}``."""
    return {name: build_component(name, Path(directory) / name) for name in BUILDERS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny test models.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--only", choices=sorted(BUILDERS), action="append")
    args = parser.parse_args(argv)
    names = args.only or list(BUILDERS)
    print(json.dumps({name: build_component(name, args.directory / name) for name in names}, indent=2))


if __name__ == "__main__":
    main()
