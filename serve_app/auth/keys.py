"""API keys: made, hashed, and looked up from the config and a key file that may change at any time.

A key is 32 random bytes (``secrets.token_urlsafe``, 256 bits) behind a ``fdk_`` prefix (so
secret scanners can spot one). The service stores only ``sha256:<hex>`` of it. A fast unkeyed
hash is enough for keys of this entropy: finding a key from its hash means searching 2^256
values, so a leaked key file gives nothing away, and hashing a presented key costs about a
microsecond per request. Slow password hashes (bcrypt, scrypt, argon2) exist for low-entropy
*passwords*; on every request they would cost tens to hundreds of milliseconds of CPU (or a cache
of plain keys, which defeats them). A keyed HMAC would only add a second secret to deploy and
rotate. The demo keys of ``configs/overlays/auth-demo.yaml`` are short on purpose and public.

:class:`KeyStore` finds the key a request presents. Keys written in the config never change;
the key file is re-read when its content changes (checked at most every ``reload_interval_s``,
on the request path: one small read), so adding, rotating or removing a key needs no restart. A
file that cannot be read at start stops the replica with the reason; one that turns unreadable
or invalid later keeps the last valid keys (logged), except a file that is gone: then none of its
keys is accepted.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from serve_app.config import ApiKeyArgs, check_unique_keys

logger = logging.getLogger("ray.serve")

KEY_PREFIX = "fdk_"
HASH_PREFIX = "sha256:"
_KEY_LIST = TypeAdapter(list[ApiKeyArgs])


class KeyFileError(ValueError):
    """The key file cannot be read or is not a valid list of keys (says which and why)."""


def new_key() -> str:
    """A fresh random API key (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What the config stores for ``key``: ``sha256:<hex>`` of its UTF-8 bytes."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_entry(key_id: str, key: str, scopes: Sequence[str], **fields: Any) -> dict[str, Any]:
    """The key file / config entry of a key (validated), e.g. for ``facedetailer keys new``."""
    return entry_of(ApiKeyArgs.model_validate({"id": key_id, "hash": hash_key(key), "scopes": list(scopes), **fields}))


def entry_of(key: ApiKeyArgs) -> dict[str, Any]:
    """A key as its file entry: id, hash and scopes, and only the quotas and weight that are set."""
    return key.model_dump(exclude_defaults=True) | {"scopes": list(key.scopes)}


def parse_key_file(text: str, source: str) -> list[ApiKeyArgs]:
    """A key file's keys: YAML or JSON, a list of keys or a mapping with a ``keys`` list."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise KeyFileError(f"{source}: not valid YAML/JSON: {error}") from error
    if isinstance(document, dict):
        document = document.get("keys")
    if document is None:
        document = []
    if not isinstance(document, list):
        raise KeyFileError(f"{source}: expected a list of keys or a mapping with a 'keys' list")
    try:
        keys = _KEY_LIST.validate_python(document)
    except ValidationError as error:
        raise KeyFileError(f"{source}: {error}") from error
    try:
        check_unique_keys(keys, source)
    except ValueError as error:
        raise KeyFileError(str(error)) from error
    return keys


class KeyStore:
    """The accepted keys by hash: the config's, plus the key file's as it is now."""

    def __init__(
        self,
        keys: Sequence[ApiKeyArgs] = (),
        keys_file: str | Path | None = None,
        reload_interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inline = list(keys)
        self.keys_file = Path(keys_file) if keys_file is not None else None
        self.reload_interval_s = reload_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._file_keys: list[ApiKeyArgs] = []
        self._file_digest: bytes | None = None
        self._by_hash: dict[str, ApiKeyArgs] = {}
        self._checked_at = clock()
        if self.keys_file is not None:
            text = self._read()
            if text is None:
                raise KeyFileError(f"auth.keys_file {self.keys_file}: cannot be read")
            self._file_keys = parse_key_file(text, f"auth.keys_file {self.keys_file}")
            self._file_digest = hashlib.sha256(text.encode()).digest()
        self._index()

    @property
    def ids(self) -> list[str]:
        return [key.id for key in self._by_hash.values()]

    def find(self, key: str) -> ApiKeyArgs | None:
        """The entry of a presented key, or None (re-reads a changed key file first, when due)."""
        self.refresh()
        return self._by_hash.get(hash_key(key))

    def refresh(self, force: bool = False) -> bool:
        """Re-read the key file if ``reload_interval_s`` has passed (or ``force``); True if the keys changed."""
        if self.keys_file is None:
            return False
        now = self._clock()
        if not force and now - self._checked_at < self.reload_interval_s:
            return False
        with self._lock:
            if not force and now - self._checked_at < self.reload_interval_s:
                return False  # another thread has just checked
            self._checked_at = now
            return self._reload()

    def _reload(self) -> bool:
        text = self._read()
        if text is None:
            if self._file_keys:
                logger.error("auth.keys_file %s is gone: its %d keys are refused", self.keys_file, len(self._file_keys))
            self._file_keys, self._file_digest = [], None
            self._index()
            return True
        digest = hashlib.sha256(text.encode()).digest()
        if digest == self._file_digest:
            return False
        try:
            keys = parse_key_file(text, f"auth.keys_file {self.keys_file}")
            self._check_against_inline(keys)
        except KeyFileError as error:
            logger.error("%s; keeping the %d keys read before", error, len(self._file_keys))
            return False
        self._file_keys, self._file_digest = keys, digest
        self._index()
        logger.info("auth.keys_file %s re-read: %d keys", self.keys_file, len(keys))
        return True

    def _read(self) -> str | None:
        assert self.keys_file is not None
        try:
            return self.keys_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def _check_against_inline(self, keys: list[ApiKeyArgs]) -> None:
        try:
            check_unique_keys(self.inline + keys, f"auth.keys and auth.keys_file {self.keys_file}")
        except ValueError as error:
            raise KeyFileError(str(error)) from error

    def _index(self) -> None:
        self._check_against_inline(self._file_keys)
        self._by_hash = {key.hash: key for key in self.inline + self._file_keys}
