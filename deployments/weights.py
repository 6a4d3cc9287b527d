"""Resolve a model reference (local path, Hugging Face file, or URL) to a local file.

Every model deployment loads its weights through :func:`resolve_weights`, so the tests, which
use files on disk, exercise the same code as production, which may name a hub file or a URL.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

DEFAULT_CACHE_DIR = Path(os.environ.get("FACEDETAILER_CACHE", Path.home() / ".cache" / "facedetailer"))
SIM_SCHEME = "sim://"  # simulated models (deployments/simulated.py): no weights at all


class WeightsNotFoundError(FileNotFoundError):
    """The weights a deployment was configured with cannot be found or fetched."""


class CorruptWeightsError(ValueError):
    """A weights file exists but cannot be read as the expected model."""


def is_simulated(reference: str | os.PathLike[str] | None) -> bool:
    """A ``sim://`` reference: :mod:`deployments.model_loading` hands it to :mod:`deployments.simulated`."""
    return reference is not None and os.fspath(reference).startswith(SIM_SCHEME)


def is_url(reference: str) -> bool:
    return reference.startswith(("http://", "https://"))


def parse_hf_reference(reference: str) -> tuple[str, str, str | None] | None:
    """Split ``hf://owner/repo/path/in/repo[@revision]`` or ``owner/repo/file.ext`` into parts.

    A bare ``owner/repo/file`` is treated as a hub reference only when it is not a local path,
    so a relative path that exists on disk always wins.
    """
    text = reference.removeprefix("hf://")
    revision: str | None = None
    if "@" in text:
        text, revision = text.rsplit("@", 1)
    parts = text.split("/")
    if len(parts) < 3 or not parts[-1]:
        return None
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


def _download_url(url: str, cache_dir: Path) -> Path:
    """Download once into the cache; a partial download never becomes the cached file."""
    name = Path(urllib.request.urlparse(url).path).name or "weights"
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    target = cache_dir / "url" / digest / name
    if target.is_file():
        return target
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("FACEDETAILER_OFFLINE") == "1":
        raise WeightsNotFoundError(f"{url}: not in the cache ({target}) and offline mode is on")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as partial:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - operator-configured URL
                shutil.copyfileobj(response, partial)
        except Exception as error:
            Path(partial.name).unlink(missing_ok=True)
            raise WeightsNotFoundError(f"{url}: download failed: {error}") from error
    os.replace(partial.name, target)
    return target


def _resolve_package_file(reference: str) -> Path:
    """``pkg://package/relative/path``: a file shipped inside an installed Python package."""
    import importlib.util

    package, _, relative = reference.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise WeightsNotFoundError(f"{reference}: package {package!r} is not installed")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise WeightsNotFoundError(f"{reference}: {path} does not exist")
    return path


def _resolve_tiny_model(reference: str) -> Path:
    """``tiny://component/key``: a self-built tiny test model, built on first use."""
    from deployments.testing.build_tiny_models import build_component, default_tiny_models_dir

    component, _, key = reference.removeprefix("tiny://").partition("/")
    try:
        paths = build_component(component, default_tiny_models_dir() / component)
        return Path(paths[key])
    except KeyError as error:
        raise WeightsNotFoundError(f"{reference}: unknown tiny model {error}") from error


def resolve_weights(reference: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """Return a local path for ``reference``; raise :class:`WeightsNotFoundError` naming it.

    Besides paths, hub files and URLs, ``pkg://package/path`` names a file an installed package
    ships and ``tiny://component/key`` a self-built tiny model (tests and the offline demo).
    """
    reference = os.fspath(reference)
    if is_simulated(reference):
        raise WeightsNotFoundError(
            f"{reference}: a sim:// stand-in has no weights file; load it through deployments.model_loading "
            "(load_detector, load_segmenter, load_inpainter), as the Serve deployments do"
        )
    if reference.startswith("pkg://"):
        return _resolve_package_file(reference)
    if reference.startswith("tiny://"):
        return _resolve_tiny_model(reference)
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    local = Path(reference).expanduser()
    if local.exists():
        return local
    if is_url(reference):
        return _download_url(reference, cache_dir)
    hub = parse_hf_reference(reference)
    if hub is not None and not reference.startswith(("/", ".", "~")):
        repo_id, filename, revision = hub
        from huggingface_hub import hf_hub_download

        try:
            return Path(
                hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir / "hf")
            )
        except Exception as error:
            raise WeightsNotFoundError(f"{reference}: not found locally or on the hub: {error}") from error
    raise WeightsNotFoundError(f"{reference}: no such file")
