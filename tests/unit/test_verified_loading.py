"""The serving path loads only signature-verified bytes, and refuses (fail closed) when they do not verify."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
from starlette.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.registry.loader import load_verified
from server.registry.signing import VerificationFailed
from server.settings import ModelSettings, load_settings
from server.storage.db import Database
from server.storage.migrate import upgrade
from tests.registry.conftest import build_model
from tests.unit.conftest import CHEAP_HASHER


def _settings(tmp_path, folder, **extra):
    return load_settings(
        data_dir=tmp_path / "data",
        models=[{"name": "tiny", "path": str(folder), "pool": "cpu", "max_model_len": 64}],
        **extra,
    )


def _writable(path) -> None:
    for root, dirs, files in os.walk(path):
        os.chmod(root, stat.S_IRWXU)
        for f in files:
            os.chmod(os.path.join(root, f), stat.S_IRUSR | stat.S_IWUSR)


def test_first_use_imports_signs_promotes_then_serves_the_stored_copy(tmp_path):
    folder = build_model(tmp_path / "src")
    settings = _settings(tmp_path, folder)
    upgrade(settings.sqlalchemy_url)
    db = Database(settings.sqlalchemy_url)
    try:
        first = load_verified(settings, settings.models[0], db, progress=False).info
        assert first.version == "v1" and first.path != folder and str(first.path).startswith(str(settings.data_dir))
        # The configured folder is not read again: changing it does not change what is served.
        (folder / "config.json").write_text("{}")
        again = load_verified(settings, settings.models[0], db, progress=False).info
        assert (again.version, again.digest, again.path) == (first.version, first.digest, first.path)
        # Tampering with the stored copy is refused with the reason.
        _writable(first.path)
        shard = first.path / "model-00001-of-00002.safetensors"
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
        with pytest.raises(VerificationFailed, match="modified: model-00001-of-00002.safetensors"):
            load_verified(settings, settings.models[0], db, progress=False)
    finally:
        db.dispose()


def test_server_refuses_to_serve_a_version_that_does_not_verify(tmp_path):
    folder = build_model(tmp_path / "src")
    settings = _settings(tmp_path, folder)

    def app_with_fake_engine():
        return create_app(settings, engine_factory=lambda info: FakeEngine(info), password_hasher=CHEAP_HASHER)

    app = app_with_fake_engine()
    with TestClient(app) as client:
        deadline = time.time() + 20
        while client.get("/readyz").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["models"][0]["version"] == "v1"
        stored = app.state.hub.models()[0].path
    _writable(stored)
    (stored / "extra.json").write_text("{}")
    app = app_with_fake_engine()
    with TestClient(app) as client:
        deadline = time.time() + 20
        while client.get("/readyz").json()["status"] == "starting" and time.time() < deadline:
            time.sleep(0.05)
        body = client.get("/readyz").json()
        assert client.get("/readyz").status_code == 503
        assert body["status"] == "failed" and "not covered by the signature: extra.json" in body["error"]
        assert app.state.hub.models() == []


def test_models_cli_show_and_verify_path(tmp_path):
    folder = build_model(tmp_path / "src")
    config = tmp_path / "c.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[[models]]\nname = "tiny"\npath = "{folder}"\n'
        'pool = "cpu"\nmax_model_len = 64\n'
    )

    def cli(*argv):
        return subprocess.run(
            [sys.executable, "-m", "server", "--config", str(config), "models", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )

    settings = load_settings(config)
    upgrade(settings.sqlalchemy_url)
    db = Database(settings.sqlalchemy_url)
    try:
        load_verified(settings, ModelSettings(name="tiny", path=folder, max_model_len=64), db, progress=False)
    finally:
        db.dispose()
    import json

    shown = json.loads(cli("show", "tiny", "--json").stdout)
    assert shown["active"]["digest"] and shown["active"]["path"]
    assert cli("verify", "tiny").returncode == 0
    other = build_model(tmp_path / "other", seed=3)
    bad = cli("verify", "tiny", "--path", str(other))
    assert bad.returncode == 1 and "does not match its signature" in bad.stderr
    bom = json.loads(cli("bom", "tiny").stdout)
    assert bom["specVersion"] == "1.6"
