"""Fast tests of the HTTP layer over the deterministic in-process engine (no vLLM, no model)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from server.app import create_app
from server.engine.fake import FakeEngine
from server.engine.types import ModelInfo
from server.settings import load_settings

MODEL = "SmolLM2-135M-Instruct"


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


@pytest.fixture
def settings(tmp_path):
    return load_settings(data_dir=tmp_path, engine="fake")


@pytest.fixture
def engines():
    return []


@pytest.fixture
def client(settings, engines):
    def factory(info: ModelInfo) -> FakeEngine:
        engine = FakeEngine(info)
        engines.append(engine)
        return engine

    app = create_app(settings, engine_factory=factory, resolver=lambda s, db: [fake_info()])
    with TestClient(app) as c:
        app.state.boot  # started by the lifespan
        import time

        deadline = time.time() + 10
        while not app.state.hub.ready() and time.time() < deadline:
            time.sleep(0.01)
        assert app.state.hub.ready(), app.state.hub.start_error
        yield c
