"""Locust load profile: valid and invalid requests from several API keys, each answer recorded.

Run headless by ``benchmarks/chaos.py`` (10 minutes while model replicas are killed at random)
and by ``tests/serve/test_replica_loss.py`` (a short run with one kill); both read the records
this file writes (``tests/serve/replica_chaos.py`` summarises them). By hand, against a running
service (``facedetailer serve … --overlay configs/overlays/auth-demo.yaml``)::

    FD_KEYS='{"demo-admin": "demo-admin-key"}' FD_RECORDS=/tmp/records.jsonl \\
        locust -f benchmarks/locustfile.py --headless -u 4 -r 2 -t 60s --host http://127.0.0.1:8000

Each simulated user sends with one key (round robin over ``FD_KEYS``). Its tasks, by weight:
valid ``/v1/detail`` (PNG) and ``/v1/detail/stream`` requests, and requests that must be refused
with a 4xx: an image that is not one, a value over a limit, an unknown model, malformed JSON,
no key, a wrong key, ``/v1/stats`` without the admin scope. A request is **lost** when no
answer arrives (a connection error, or nothing within ``FD_TIMEOUT_S``), or when a stream ends
without its ``result`` or ``error`` event. Environment (all optional but ``FD_RECORDS``):

- ``FD_KEYS``: JSON ``{key id: key}``; absent or ``{}``: auth off (no key tasks).
- ``FD_ADMIN_KEYS``: JSON list of the key ids that have the ``admin`` scope.
- ``FD_IMAGE``: the image valid requests send (default: a textured PNG the ``sim://`` detector
  finds one face in); ``FD_PARAMS``: their JSON parameters.
- ``FD_TIMEOUT_S``: the client's patience per request (default 300 s).
- ``FD_WAIT_S``: ``min,max`` think time between a user's requests (default ``0.5,2``).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import threading
import time
from typing import Any

import numpy as np
from locust import HttpUser, between, events, task
from PIL import Image

RECORDS_PATH = os.environ.get("FD_RECORDS", "")
KEYS: dict[str, str] = json.loads(os.environ.get("FD_KEYS") or "{}")
ADMIN_KEYS: set[str] = set(json.loads(os.environ.get("FD_ADMIN_KEYS") or "[]"))
PARAMS: dict[str, Any] = json.loads(os.environ.get("FD_PARAMS") or '{"steps": 2, "guide_size": 128, "max_size": 256}')
TIMEOUT_S = float(os.environ.get("FD_TIMEOUT_S", "300"))
WAIT_S = tuple(float(value) for value in os.environ.get("FD_WAIT_S", "0.5,2").split(","))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLIENT_ERRORS = frozenset(range(400, 500))


def textured_png(size: int = 256, seed: int = 0) -> bytes:
    """A flat image with one textured quadrant: the simulated detector's face is there."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size, 3), 110, np.uint8)
    image[size // 2 :, size // 2 :] = rng.integers(0, 256, (size - size // 2, size - size // 2, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = open(os.environ["FD_IMAGE"], "rb").read() if os.environ.get("FD_IMAGE") else textured_png()  # noqa: SIM115


class Records:
    """Every answer as one JSON line, written as it happens (a crashed run keeps what it had)."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            with self._lock:
                self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


RECORDS = Records(RECORDS_PATH)
_USER_NUMBERS = itertools.count()


@events.quitting.add_listener
def _close_records(environment: Any, **_: Any) -> None:
    RECORDS.close()


class ServiceUser(HttpUser):
    """One client of the service with its own API key (none when auth is off)."""

    wait_time = between(*WAIT_S)

    def on_start(self) -> None:
        number = next(_USER_NUMBERS)
        self.key_id = sorted(KEYS)[number % len(KEYS)] if KEYS else "open"
        self.key = KEYS.get(self.key_id)

    # ---------------------------------------------------------------- helpers

    def _headers(self, key: str | None = "own") -> dict[str, str]:
        key = self.key if key == "own" else key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _record(self, kind: str, started: float, status: int, expected: frozenset[int] | set[int],
                error: str | None = None, **extra: Any) -> None:  # fmt: skip
        RECORDS.write({
            "kind": kind, "key": self.key_id, "start": started, "latency": time.time() - started,
            "status": status, "expected": status in expected, "error": error, **extra,
        })  # fmt: skip

    def _post(self, kind: str, path: str, expected: frozenset[int] | set[int], *, image: bytes = IMAGE,
              params: str | None = None, key: str | None = "own", check_png: bool = False) -> None:  # fmt: skip
        started = time.time()
        data = {"params": params if params is not None else json.dumps(PARAMS)}
        files = {"image": ("image.png", image, "image/png")}
        try:
            with self.client.post(path, files=files, data=data, headers=self._headers(key), timeout=TIMEOUT_S,
                                  name=kind, catch_response=True) as response:  # fmt: skip
                status = response.status_code or 0
                error = None if status == 200 else response.text[:200]
                if check_png and status == 200 and not response.content.startswith(PNG_MAGIC):
                    error = "200 without a PNG body"
                if status in expected and error is None:
                    response.success()
                else:
                    response.failure(f"{status}: {error}")
        except Exception as exc:  # locust reports requests' own errors as status 0 already; anything else too
            status, error = 0, f"{type(exc).__name__}: {exc}"[:200]
        self._record(kind, started, status, expected, error, retry_after=None)

    # ---------------------------------------------------------------- valid requests

    @task(8)
    def detail(self) -> None:
        self._post("detail", "/v1/detail", {200, 429}, check_png=True)

    @task(2)
    def detail_stream(self) -> None:
        """The stream must end with ``result`` (or an ``error`` event); anything else is lost."""
        started = time.time()
        status, error, last_event, faces = 0, None, None, 0
        data = {"params": json.dumps(PARAMS)}
        files = {"image": ("image.png", IMAGE, "image/png")}
        try:
            with self.client.post("/v1/detail/stream", files=files, data=data, headers=self._headers(),
                                  timeout=TIMEOUT_S, stream=True, name="detail_stream",
                                  catch_response=True) as response:  # fmt: skip
                status = response.status_code or 0
                if status == 200:
                    event = None
                    for line in response.iter_lines(decode_unicode=True):
                        if time.time() - started > TIMEOUT_S:
                            raise TimeoutError(f"stream still open after {TIMEOUT_S} s")
                        if line.startswith("event: "):
                            event = line[len("event: "):]
                        elif line.startswith("data: ") and event is not None:
                            last_event = event
                            faces += event == "face"
                            if event == "error":
                                status = int(json.loads(line[len("data: "):]).get("status", 500))
                                error = line[:200]
                    if last_event not in ("result", "error"):
                        status, error = 0, f"stream ended after {last_event!r} without its result"
                else:
                    error = response.text[:200]
                if status in (200, 429):
                    response.success()
                else:
                    response.failure(f"{status}: {error}")
        except Exception as exc:
            status, error = 0, f"{type(exc).__name__}: {exc}"[:200]
        self._record("detail_stream", started, status, {200, 429}, error, faces=faces)

    # ---------------------------------------------------------------- invalid requests (4xx expected)

    @task(1)
    def not_an_image(self) -> None:
        self._post("not_an_image", "/v1/detail", CLIENT_ERRORS, image=b"GIF89a this is no image at all")

    @task(1)
    def over_a_limit(self) -> None:
        self._post("over_a_limit", "/v1/detail", CLIENT_ERRORS, params=json.dumps({**PARAMS, "steps": 100000}))

    @task(1)
    def unknown_model(self) -> None:
        params = {**PARAMS, "model": "no-such-checkpoint", "bbox_detector": "no-such-detector"}
        self._post("unknown_model", "/v1/detail", CLIENT_ERRORS, params=json.dumps(params))

    @task(1)
    def malformed_json(self) -> None:
        self._post("malformed_json", "/v1/detail", CLIENT_ERRORS, params='{"steps": 2, "cfg": ')

    @task(1)
    def no_key(self) -> None:
        if KEYS:
            self._post("no_key", "/v1/detail", {401}, key=None)

    @task(1)
    def wrong_key(self) -> None:
        if KEYS:
            self._post("wrong_key", "/v1/detail", {401}, key="fdk_not-a-key-of-this-service")

    @task(1)
    def stats(self) -> None:
        """``/v1/stats``: 200 for an admin key (or auth off), 403 for a key without the scope."""
        expected = {200} if not KEYS or self.key_id in ADMIN_KEYS else {403}
        started = time.time()
        try:
            with self.client.get("/v1/stats", headers=self._headers(), timeout=TIMEOUT_S, name="stats",
                                 catch_response=True) as response:  # fmt: skip
                status = response.status_code or 0
                error = None if status == 200 else response.text[:200]
                response.success() if status in expected else response.failure(f"{status}: {error}")
        except Exception as exc:
            status, error = 0, f"{type(exc).__name__}: {exc}"[:200]
        self._record("stats", started, status, expected, error)
