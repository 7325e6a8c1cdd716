"""Hot swap over the real request path with the in-process engine: a stream admitted on v1 finishes on v1
while new requests get v2; the old engine stops only when no response holds it; a refused version leaves
the old one serving and says why."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from server.app import create_app
from server.audit.models import AuditEvent
from server.engine.fake import FakeEngine
from server.engine.swap import ModelSwapper
from server.engine.types import ModelInfo
from server.identity import service
from server.identity.apikeys import create_key
from server.identity.passwords import PasswordHasher
from server.registry.signing import VerificationFailed
from server.settings import ModelSettings, load_settings

MODEL = "m"


def _info(version: str) -> ModelInfo:
    digest = hashlib.sha256(version.encode()).hexdigest()
    return ModelInfo(MODEL, version, digest, Path("."), 4096, "cpu", 1_700_000_000)


@pytest.fixture
def world(tmp_path):
    settings = load_settings(data_dir=tmp_path, engine="fake", models=[{"name": MODEL}])
    engines: list[FakeEngine] = []

    def factory(info: ModelInfo) -> FakeEngine:
        engines.append(FakeEngine(info, token_delay=0.01))
        return engines[-1]

    app = create_app(
        settings,
        engine_factory=factory,
        resolver=lambda s, db: [_info("v1")],
        password_hasher=PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1),
    )
    with TestClient(app) as client:
        deadline = time.time() + 10
        while not app.state.hub.ready() and time.time() < deadline:
            time.sleep(0.01)
        with app.state.db.session() as session:
            user = service.operator_account(session)
            _, key = create_key(
                session, app.state.keyring.mac, org_id=user.org_id, user_id=user.id, name="k", scopes=["*"]
            )
        client.headers["Authorization"] = f"Bearer {key}"
        active = {"version": "v1"}

        def resolve(model: ModelSettings) -> ModelInfo:
            if active["version"] == "bad":
                raise VerificationFailed("signature does not match the files (test)")
            return _info(active["version"])

        swapper = ModelSwapper(
            app.state.hub,
            [ModelSettings(name=MODEL)],
            lambda: {MODEL: _info(active["version"]).digest},
            resolve,
            factory,
            app.state.audit_sink,
            grace_seconds=30,
        )
        yield client, swapper, active, engines


def _chat(client, **extra):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_a_stream_admitted_on_v1_finishes_on_v1_while_new_requests_get_v2(world):
    client, swapper, active, engines = world
    chunks: list[dict] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200 and resp.headers["x-model-version"] == "v1"
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(10)
    active["version"] = "v2"
    client.portal.call(swapper.check)
    old, new = engines
    assert new.info.version == "v2" and new.ready()
    assert old.ready(), "the old engine must keep running while a response holds it"

    resp = _chat(client)
    assert resp.status_code == 200 and resp.headers["x-model-version"] == "v2"
    assert resp.json()["system_fingerprint"] == new.info.fingerprint

    reader.join(timeout=30)
    assert not reader.is_alive()
    assert {c["system_fingerprint"] for c in chunks} == {old.info.fingerprint}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.time() + 5
    while old.ready() and time.time() < deadline:
        time.sleep(0.02)
    assert not old.ready(), "the old engine stops once nothing holds it"
    assert client.app.state.hub.holds(old) == 0 and client.app.state.hub.holds(new) == 0

    # Rolling back is the same move in the other direction.
    active["version"] = "v1"
    client.portal.call(swapper.check)
    assert _chat(client).headers["x-model-version"] == "v1"


def test_a_version_that_does_not_verify_is_refused_and_the_old_one_keeps_serving(world):
    client, swapper, active, engines = world
    active["version"] = "bad"
    client.portal.call(swapper.check)
    assert len(engines) == 1 and engines[0].ready()
    resp = _chat(client)
    assert resp.status_code == 200 and resp.headers["x-model-version"] == "v1"
    ready = client.get("/readyz").json()
    assert "signature does not match" in ready["swap_errors"][MODEL]
    client.app.state.audit_sink.flush()
    with client.app.state.db.session() as session:  # a system event: only the installation's owner reads it
        outcomes = session.scalars(select(AuditEvent.outcome).where(AuditEvent.action == "registry.swap")).all()
    assert outcomes == ["failure"]

    # Rolling back to the version still served clears the error: nothing is left to swap.
    active["version"] = "v1"
    client.portal.call(swapper.check)
    assert MODEL not in (client.get("/readyz").json().get("swap_errors") or {})
    assert len(engines) == 1


def test_holds_are_released_on_refusals_and_errors(world):
    client, _, _, engines = world
    assert _chat(client, max_tokens=10**6).status_code == 400  # refused before admission
    assert _chat(client, n=1).status_code == 200
    assert client.app.state.hub.holds(engines[0]) == 0
