"""Fast tests of the HTTP layer over the deterministic in-process engine (no vLLM, no model)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.engine.types import ModelInfo
from server.identity import service
from server.identity.apikeys import create_key
from server.identity.passwords import PasswordHasher
from server.settings import load_settings

MODEL = "SmolLM2-135M-Instruct"
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


def fake_info(max_model_len: int = 512) -> ModelInfo:
    return ModelInfo(
        name=MODEL,
        version="v1",
        digest=hashlib.sha256(b"fake model").hexdigest(),
        path=Path("."),
        max_model_len=max_model_len,
        pool="cpu",
        created=1_700_000_000,
    )


def make_key(app, scopes: list[str], *, user_id: str | None = None, **kwargs) -> str:
    """Create an API key directly in the app's database (for the operator service account by default)."""
    with app.state.db.session() as session:
        user = service.operator_account(session) if user_id is None else None
        owner_id = user.id if user is not None else user_id
        org_id = user.org_id if user is not None else kwargs.pop("org_id")
        _, plaintext = create_key(
            session, app.state.keyring.mac, org_id=org_id, user_id=owner_id, name="test", scopes=scopes, **kwargs
        )
    return plaintext


def build_app(settings, engines: list | None = None):
    def factory(info: ModelInfo) -> FakeEngine:
        engine = FakeEngine(info)
        if engines is not None:
            engines.append(engine)
        return engine

    return create_app(
        settings, engine_factory=factory, resolver=lambda s, db: [fake_info()], password_hasher=CHEAP_HASHER
    )


def wait_ready(app) -> None:
    deadline = time.time() + 10
    while not app.state.hub.ready() and time.time() < deadline:
        time.sleep(0.01)
    assert app.state.hub.ready(), app.state.hub.start_error


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path, engine="fake")


@pytest.fixture
def engines():
    return []


@pytest.fixture
def app_client(settings, engines):
    app = build_app(settings, engines)
    with TestClient(app) as c:
        wait_ready(app)
        yield c


@pytest.fixture
def client(app_client):
    """A client whose requests carry an API key with inference and metrics scopes."""
    key = make_key(app_client.app, ["inference", "metrics:read"])
    app_client.headers["Authorization"] = f"Bearer {key}"
    return app_client
