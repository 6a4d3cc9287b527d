"""Session-wide test setup: no network, offline model libraries, tiny models built once.

The offline variables are set at import time, before any model library is imported, and are
inherited by every subprocess (including Ray workers started by the tests). Proxies point at a
closed loopback port so that a stray HTTP request fails at once instead of leaving the machine,
and this process refuses socket connections to any non-loopback address.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("FACEDETAILER_TEST_CACHE", REPO_ROOT / ".cache" / "tests"))
CACHE_DIR.mkdir(parents=True, exist_ok=True)

from deployments.runtime_env import apply_offline_env  # noqa: E402
from tests.ast_parse_retry import install_ast_parse_retry  # noqa: E402

apply_offline_env(CACHE_DIR / "ultralytics")
os.environ.setdefault("FACEDETAILER_CACHE", str(CACHE_DIR / "weights"))
os.environ["FACEDETAILER_TINY_MODELS"] = str(CACHE_DIR / "tiny-models")
_BLOCKED_PROXY = "http://127.0.0.1:9"
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ[_name] = _BLOCKED_PROXY
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "localhost,127.0.0.1,::1"


class NetworkAccessError(RuntimeError):
    """A test tried to reach a non-loopback address."""


_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex


def _check_address(sock: socket.socket, address: object) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return
    host = address[0]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise NetworkAccessError(f"test tried to connect to {address!r}: the tests run offline")


def _guarded_connect(self: socket.socket, address: object) -> None:
    _check_address(self, address)
    return _original_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: object) -> int:
    _check_address(self, address)
    return _original_connect_ex(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]


install_ast_parse_retry()  # CPython 3.11.7's threads-vs-ast.parse bug (see tests/ast_parse_retry.py)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return CACHE_DIR


TINY_MODELS_DIR = CACHE_DIR / "tiny-models"


def _tiny(component: str) -> dict:
    from deployments.testing.build_tiny_models import build_component

    return build_component(component, TINY_MODELS_DIR / component)


@pytest.fixture(scope="session")
def tiny_yolo() -> dict:
    """Paths of the tiny YOLO models (built on first use, reused by later sessions)."""
    return _tiny("yolo")


@pytest.fixture(scope="session")
def tiny_sam() -> dict:
    return _tiny("sam")


@pytest.fixture(scope="session")
def tiny_sd() -> dict:
    return _tiny("sd")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run tests/cluster first: its multi-node cluster must own the session's Ray connection
    (the other Ray tests start their own instance, held until the session ends)."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("cluster") else 1)


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_sd: dict) -> dict:
    """A ControlNet made from the tiny SD UNet (``ControlNetModel.from_unet``, random weights)."""
    return _tiny("controlnet")


@pytest.fixture(scope="session")
def tiny_sd_alt() -> dict:
    """A second tiny SD 1.x checkpoint: the same architecture with other random weights."""
    return _tiny("sd_alt")


@pytest.fixture(scope="session")
def tiny_sdxl_vpred() -> dict:
    """A tiny SDXL v-prediction + zero-terminal-SNR checkpoint: a folder, and a single file with ComfyUI's markers."""
    return _tiny("sdxl_vpred")


@pytest.fixture(scope="session")
def tiny_sd3() -> dict:
    return _tiny("sd3")


@pytest.fixture(scope="session")
def tiny_flux_dev() -> dict:
    """Tiny Flux.1 dev: a diffusers folder and ComfyUI's split layout (split_diffusion_model, split_clip_l, …)."""
    return _tiny("flux_dev")


@pytest.fixture(scope="session")
def tiny_flux_schnell() -> dict:
    return _tiny("flux_schnell")


@pytest.fixture(scope="session")
def tiny_flux_fill() -> dict:
    return _tiny("flux_fill")
