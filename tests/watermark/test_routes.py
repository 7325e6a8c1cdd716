"""`POST /v1/watermark/detect` over the app with the in-process engine."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

from server.identity import service
from server.identity.apikeys import create_key
from server.watermark.routes import DetectLimiter
from tests.watermark.conftest import MODEL, fake_app, generate

FIELDS = {"detected", "scheme", "key_id", "p_value", "z", "tokens_scored", "green_fraction"}


def _key(app, scopes: list[str]) -> str:
    with app.state.db.session() as session:
        user = service.operator_account(session)
        _, plaintext = create_key(
            session, app.state.keyring.mac, org_id=user.org_id, user_id=user.id, name="t", scopes=scopes
        )
    return plaintext


@pytest.fixture
def client(tmp_path):
    app = fake_app(tmp_path, watermark={"detect_requests_per_minute": 6})
    with TestClient(app) as c:
        deadline = time.time() + 10
        while not app.state.hub.ready() and time.time() < deadline:
            time.sleep(0.01)
        c.headers["Authorization"] = f"Bearer {_key(app, ['watermark:detect', 'models:read'])}"
        yield c


def test_detects_a_watermarked_answer_and_returns_aggregates_only(client, sealer):
    default = client.app.state.watermark_keys.ensure_default_key()
    tokens = generate(sealer, [default], 100, vocab=256, seed=1)[0]
    found = client.post("/v1/watermark/detect", json={"model": MODEL, "token_ids": tokens})
    assert found.status_code == 200, found.text
    body = found.json()
    assert set(body) == FIELDS
    assert body["detected"] and body["key_id"] == default.key_id and body["scheme"] == "kgw-selfhash"
    assert body["p_value"] < 1e-4 and body["tokens_scored"] > 60
    prose = "The quick brown fox jumps over the lazy dog while seven wizards quietly hex jumbled boxes of zinc. "
    plain = client.post("/v1/watermark/detect", json={"model": MODEL, "text": prose * 3})
    assert plain.status_code == 200 and plain.json()["detected"] is False
    assert set(plain.json()) == FIELDS


def test_too_short_says_why(client):
    client.app.state.watermark_keys.ensure_default_key()
    body = client.post("/v1/watermark/detect", json={"model": MODEL, "text": "hi"}).json()
    assert body["detected"] is False and body["reason"] == "too_few_tokens"


@pytest.mark.parametrize(
    "payload, code",
    [
        ({"model": MODEL}, "invalid_value"),
        ({"model": MODEL, "text": "x", "token_ids": [1]}, "invalid_value"),
        ({"model": MODEL, "text": "x", "watermark": False}, "unknown_field"),
        ({"model": MODEL, "token_ids": [-1]}, "invalid_value"),
        ({"model": MODEL, "token_ids": ["1"]}, "invalid_value"),
        ({"model": MODEL, "text": ""}, "invalid_value"),
    ],
)
def test_strict_request_model(client, payload, code):
    resp = client.post("/v1/watermark/detect", json=payload)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == code, resp.text


def test_needs_the_detect_permission(client):
    payload = {"model": MODEL, "text": "x" * 40}
    anonymous = client.post("/v1/watermark/detect", json=payload, headers={"Authorization": ""})
    assert anonymous.status_code == 401
    inference_only = _key(client.app, ["inference"])
    denied = client.post("/v1/watermark/detect", json=payload, headers={"Authorization": f"Bearer {inference_only}"})
    assert denied.status_code == 403


def test_rate_limited_per_credential(client):
    client.app.state.watermark_keys.ensure_default_key()
    payload = {"model": MODEL, "text": "some text to test " * 3}
    statuses = [client.post("/v1/watermark/detect", json=payload).status_code for _ in range(6)]
    assert statuses == [200] * 6
    limited = client.post("/v1/watermark/detect", json=payload)
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_exceeded"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["Retry-After"]) >= 1
    other = _key(client.app, ["watermark:detect"])  # another credential has its own budget
    assert client.post("/v1/watermark/detect", json=payload, headers={"Authorization": f"Bearer {other}"}).is_success


def test_limiter_window_slides():
    now = [0.0]
    limiter = DetectLimiter(2, clock=lambda: now[0])
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(Exception, match="per minute"):
        limiter.check("a")
    now[0] = 60.0
    limiter.check("a")
