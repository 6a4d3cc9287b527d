"""Process environment for model replicas: offline switches and thread counts.

Ray replicas start with OMP_NUM_THREADS=1 and inherit nothing from the driver's shell, so the
configs pass these through ``runtime_env.env_vars``; tests and the CLI apply them in-process.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DIFFUSERS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "YOLO_VERBOSE": "False",
    "FACEDETAILER_OFFLINE": "1",
}


def offline_env(config_dir: Path | None = None) -> dict[str, str]:
    """The variables that keep every model library off the network."""
    env = dict(OFFLINE_ENV)
    ultralytics_dir = config_dir or Path(os.environ.get("YOLO_CONFIG_DIR", Path.home() / ".config" / "Ultralytics"))
    env["YOLO_CONFIG_DIR"] = str(ultralytics_dir)
    return env


def apply_offline_env(config_dir: Path | None = None) -> dict[str, str]:
    """Set the offline variables in this process (before the libraries are imported)."""
    env = offline_env(config_dir)
    os.environ.update(env)
    return env


def configure_ultralytics_offline() -> None:
    """Turn off ultralytics' hub sync, update checks and telemetry in its settings file."""
    from ultralytics.utils import SETTINGS

    wanted = {"sync": False, "hub": False} if "hub" in SETTINGS else {"sync": False}
    if any(SETTINGS.get(key) != value for key, value in wanted.items()):
        SETTINGS.update(wanted)
