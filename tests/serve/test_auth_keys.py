"""API keys without Ray: hashing, the config model, the key file and its rotation, the gate's 401/403.

Rotation runs on a fake clock: a key removed from the file is refused at the first request after
``reload_interval_s`` (the served app's rotation over HTTP is in test_auth_http.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re

import pytest
import yaml
from pydantic import ValidationError

from serve_app.auth import AuthError, AuthGate
from serve_app.auth.keys import KeyFileError, KeyStore, hash_key, key_entry, new_key, parse_key_file
from serve_app.config import ApiKeyArgs, AppArgs, AuthArgs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(key_id: str, key: str, scopes: list[str], **fields) -> dict:
    return key_entry(key_id, key, scopes, **fields)


def write_keys(path, *entries: dict) -> None:
    path.write_text(yaml.safe_dump({"keys": list(entries)}))


def test_new_keys_are_random_256_bit_and_stored_as_their_sha256():
    first, second = new_key(), new_key()
    assert first != second and first.startswith("fdk_") and len(first) >= 4 + 43
    assert hash_key("demo-detail-key") == "sha256:" + hashlib.sha256(b"demo-detail-key").hexdigest()
    made = entry("ci", first, ["detail"], quotas={"requests_per_minute": 5}, weight=2)
    assert made == {"id": "ci", "hash": hash_key(first), "scopes": ["detail"],
                    "quotas": {"requests_per_minute": 5}, "weight": 2.0}  # fmt: skip
    assert ApiKeyArgs.model_validate(made).quotas.requests_per_minute == 5


@pytest.mark.parametrize(
    ("auth", "needle"),
    [
        ({}, "set keys"),
        ({"keys": [{"id": "a", "hash": "plain-text-key", "scopes": ["detail"]}]}, "hash"),
        ({"keys": [{"id": "a", "hash": hash_key("x"), "scopes": ["write"]}]}, "scopes"),
        ({"keys": [{"id": "a", "hash": hash_key("x"), "scopes": []}]}, "scopes"),
        ({"keys": [{"id": "../a", "hash": hash_key("x"), "scopes": ["detail"]}]}, "id"),
        ({"keys": [entry("a", "x", ["detail"]), entry("a", "y", ["detail"])]}, "appears twice"),
        ({"keys": [entry("a", "x", ["detail"]), entry("b", "x", ["admin"])]}, "same hash"),
        ({"keys": [{"id": "a", "hash": hash_key("x"), "scopes": ["detail"], "weight": 0}]}, "weight"),
        ({"keys": [entry("a", "x", ["detail"])], "keys_file": "k.yaml", "colour": "red"}, "colour"),
    ],
)
def test_auth_config_errors_name_the_field(auth, needle):
    base = {"detector": {"model": "x.pt"}, "inpainter": {"model": "y"}}
    with pytest.raises(ValidationError, match=needle):
        AppArgs.model_validate({**base, "auth": auth})


def test_without_auth_the_config_has_none():
    assert AppArgs.model_validate({"detector": {"model": "x.pt"}, "inpainter": {"model": "y"}}).auth is None


def test_key_file_formats_and_errors(tmp_path):
    keys = [entry("a", "key-a", ["detail"])]
    assert [key.id for key in parse_key_file(yaml.safe_dump(keys), "f")] == ["a"]
    assert [key.id for key in parse_key_file(json.dumps({"keys": keys}), "f")] == ["a"]
    assert parse_key_file("", "f") == []
    for text, needle in [("keys: {a: 1}", "list"), ("[{id: a}]", "hash"), ("{: [", "YAML")]:
        with pytest.raises(KeyFileError, match=needle):
            parse_key_file(text, "f")
    with pytest.raises(KeyFileError, match="cannot be read"):
        KeyStore(keys_file=tmp_path / "missing.yaml")
    clash = tmp_path / "clash.yaml"
    write_keys(clash, entry("a", "other", ["detail"]))
    with pytest.raises(KeyFileError, match="appears twice"):
        KeyStore([ApiKeyArgs.model_validate(keys[0])], clash)


def test_key_file_rotation_without_restart(tmp_path):
    clock = Clock()
    path = tmp_path / "keys.yaml"
    write_keys(path, entry("old", "old-key", ["detail"]))
    inline = [ApiKeyArgs.model_validate(entry("ops", "ops-key", ["admin"]))]
    store = KeyStore(inline, path, reload_interval_s=2.0, clock=clock)
    assert store.find("old-key").id == "old" and store.find("ops-key").id == "ops" and store.find("nope") is None

    write_keys(path, entry("new", "new-key", ["detail"]))  # rotation: the old key removed, a new one added
    clock.now += 1.0
    assert store.find("old-key") is not None, "not re-read before reload_interval_s"
    clock.now += 1.0
    assert store.find("old-key") is None and store.find("new-key").id == "new"
    assert store.find("ops-key").id == "ops", "config keys stay"

    path.write_text("keys: [broken")  # a half-written file keeps the last valid keys
    clock.now += 2.0
    assert store.find("new-key").id == "new"
    path.unlink()  # a file that is gone: none of its keys
    clock.now += 2.0
    assert store.find("new-key") is None and store.find("ops-key").id == "ops"
    write_keys(path, entry("back", "back-key", ["detail"]))
    clock.now += 2.0
    assert store.find("back-key").id == "back"


def gate(*keys: dict, **auth) -> AuthGate:
    args = AuthArgs.model_validate({"keys": list(keys), **auth})
    return AuthGate(args, request_timeout_s=60, find_ledger=None)  # the replica's own ledger


def test_401_without_or_with_a_bad_key_and_403_without_the_scope():
    checker = gate(entry("user", "user-key", ["detail"]), entry("ops", "ops-key", ["detail", "admin"]))
    for header in (None, "", "Basic dXNlcjpwdw==", "Bearer", "Bearer  "):
        with pytest.raises(AuthError) as raised:
            checker.authenticate(header, "detail")
        assert raised.value.status_code == 401 and "Authorization: Bearer" in raised.value.message
        assert raised.value.headers == {"WWW-Authenticate": 'Bearer realm="facedetailer"'}
    with pytest.raises(AuthError) as raised:
        checker.authenticate("Bearer user-key-typo", "detail")
    assert raised.value.status_code == 401 and 'error="invalid_token"' in raised.value.headers["WWW-Authenticate"]
    assert "user-key" not in raised.value.message
    with pytest.raises(AuthError) as raised:
        checker.authenticate("Bearer user-key", "admin")
    assert raised.value.status_code == 403 and "'admin' scope" in raised.value.message
    assert re.search(r'error="insufficient_scope", scope="admin"', raised.value.headers["WWW-Authenticate"])
    caller = checker.authenticate("bearer ops-key", "admin")  # the scheme is case-insensitive
    assert caller.key_id == "ops" and caller.scopes == {"detail", "admin"}
    assert checker.identify("Bearer nope") is None and checker.identify("Bearer user-key").key_id == "user"


def test_the_fair_queue_tenant_is_the_key_id_and_weight_never_the_secret():
    fair = gate(entry("heavy", "heavy-key", ["detail"], weight=3))
    caller = fair.authenticate("Bearer heavy-key", "detail")
    assert fair.tenant(caller) == ("heavy", 3.0)
    assert fair.tenant(None) == ("", 1.0)
    fifo = gate(entry("heavy", "heavy-key", ["detail"], weight=3), fair_queueing=False)
    assert fifo.tenant(caller) == ("", 1.0)


def test_the_gate_counts_requests_per_minute_on_its_own_ledger_without_ray():
    checker = gate(entry("demo", "demo-detail-key", ["detail"], quotas={"requests_per_minute": 2}))
    caller = checker.authenticate("Bearer demo-detail-key", "detail")

    async def three() -> list[int | None]:
        statuses: list[int | None] = []
        for _ in range(3):
            try:
                await checker.admit(caller)
                statuses.append(None)
            except AuthError as error:
                statuses.append(error.status_code)
                assert 1 <= int(error.headers["Retry-After"]) <= 60
        return statuses

    assert asyncio.run(three()) == [None, None, 429]


def test_cli_makes_keys_into_a_key_file_the_service_reads_and_removes_them(tmp_path, capsys, monkeypatch):
    from serve_app.cli import main

    path = tmp_path / "keys.yaml"
    main(["keys", "new", "--id", "load-a", "--scopes", "detail", "--concurrent-crops", "8", "--file", str(path)])
    key_a = capsys.readouterr().out.strip()
    main(["keys", "new", "--id", "ops", "--scopes", "detail", "admin", "--weight", "2", "--file", str(path)])
    key_ops = capsys.readouterr().out.strip()
    assert key_a.startswith("fdk_") and key_a != key_ops
    assert key_a not in path.read_text() and (path.stat().st_mode & 0o777) == 0o600
    store = KeyStore(keys_file=path)
    assert store.find(key_a).quotas.concurrent_crops == 8 and store.find(key_ops).weight == 2.0
    with pytest.raises(SystemExit, match="appears twice"):
        main(["keys", "new", "--id", "ops", "--scopes", "detail", "--file", str(path)])
    main(["keys", "remove", "--id", "load-a", "--file", str(path)])
    assert store.refresh(force=True) and store.find(key_a) is None and store.find(key_ops).id == "ops"
    with pytest.raises(SystemExit, match="no key 'load-a'"):
        main(["keys", "remove", "--id", "load-a", "--file", str(path)])
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("demo-detail-key\n"))
    main(["keys", "new", "--id", "demo", "--scopes", "detail", "--requests-per-minute", "2", "--key-from-stdin"])
    [printed] = yaml.safe_load(capsys.readouterr().out)
    assert printed == {"id": "demo", "hash": hash_key("demo-detail-key"), "scopes": ["detail"],
                       "quotas": {"requests_per_minute": 2}}  # fmt: skip
