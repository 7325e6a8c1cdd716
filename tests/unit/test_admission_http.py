"""Admission control through the HTTP API (fake engine, in-process): headers, refusals, pools, fail closed."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from starlette.testclient import TestClient

from server.identity import service
from server.settings import load_settings
from tests.unit.conftest import MODEL, build_app, make_key, wait_ready


def chat(max_tokens: int = 20) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": max_tokens,
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def step_up_token(app) -> str:
    with app.state.db.session() as s:
        op = service.operator_account(s)
        user_id, org_id = op.id, op.org_id
    token, _ = app.state.tokens.issue(
        sub=user_id, org=org_id, scopes=["*"], amr=["pwd", "otp"], auth_time=int(time.time())
    )
    return token


@pytest.fixture
def make_client(tmp_path):
    clients = []

    def make(**overrides):
        # New keys are throttled by default (adaptive limits); tests of other limits start from full ones.
        overrides.setdefault("admission", {"new_key_age_seconds": 0})
        app = build_app(load_settings(data_dir=tmp_path / str(len(clients)), engine="fake", **overrides))
        client = TestClient(app)
        client.__enter__()
        wait_ready(app)
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def test_rate_limit_headers_on_success(client):
    resp = client.post("/v1/chat/completions", json=chat())
    assert resp.status_code == 200
    for name in (
        "limit-requests",
        "remaining-requests",
        "reset-requests",
        "limit-tokens",
        "remaining-tokens",
        "reset-tokens",
    ):
        assert f"x-ratelimit-{name}" in resp.headers, name
    assert int(resp.headers["x-ratelimit-remaining-requests"]) < int(resp.headers["x-ratelimit-limit-requests"])


def test_requests_per_minute_refusal_is_429_with_retry_after(make_client):
    client = make_client()
    key = make_key(client.app, ["inference"], limits={"rpm": 2})
    statuses = [client.post("/v1/chat/completions", json=chat(), headers=bearer(key)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    refused = statuses[-1]
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and "requests per minute" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_token_reservation_cannot_be_overshot_by_concurrent_requests(make_client):
    client = make_client()
    key = make_key(client.app, ["inference"], limits={"tpm": 300})

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=bearer(key)) as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=chat(60)) for _ in range(5)))

    results = asyncio.run(burst())
    ok = [r for r in results if r.status_code == 200]
    assert len(ok) >= 1 and all(r.status_code in (200, 429) for r in results)
    used = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert used <= 300
    # Five answers would use more than 300 tokens: some must have been refused up front.
    assert any(r.status_code == 429 for r in results)


def test_reservation_that_can_never_fit(make_client):
    client = make_client()
    key = make_key(client.app, ["inference"], limits={"tpm": 50})
    resp = client.post("/v1/chat/completions", json=chat(100), headers=bearer(key))
    assert resp.status_code == 429 and "can never fit" in resp.json()["error"]["message"]
    assert "retry-after" not in resp.headers


def test_daily_quota_is_insufficient_quota(make_client):
    client = make_client()
    key = make_key(client.app, ["inference"], limits={"tpd": 120})
    assert client.post("/v1/chat/completions", json=chat(40), headers=bearer(key)).status_code == 200
    resp = client.post("/v1/chat/completions", json=chat(90), headers=bearer(key))
    assert resp.status_code == 429
    assert resp.json()["error"]["type"] == "insufficient_quota" and resp.json()["error"]["code"] == "insufficient_quota"


def test_new_keys_get_scaled_limits_and_refusals_are_audited(make_client):
    client = make_client(admission={"new_key_age_seconds": 3600, "new_key_factor": 0.5})
    key = make_key(client.app, ["inference"], limits={"rpm": 4})
    statuses = [client.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    admin = make_key(client.app, ["audit:read"])
    events = client.get("/v1/admin/audit", params={"action": "admission"}, headers=bearer(admin)).json()["data"]
    assert events and events[0]["outcome"] == "denied" and "new_key" in events[0]["details"]["adaptive"]


def test_risk_score_hook_scales_limits(make_client):
    client = make_client(admission={"new_key_age_seconds": 0})
    key = make_key(client.app, ["inference"], limits={"rpm": 10})
    client.app.state.gatekeeper.risk.set_score(key.split("-")[1], 0.8)
    statuses = [client.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # 10 * (1 - 0.8) = 2


def test_drain_and_isolate_through_the_admin_api(make_client):
    client = make_client()
    key = make_key(client.app, ["inference"])
    token = step_up_token(client.app)
    assert client.post("/v1/admin/pools/cpu/drain", headers=bearer(make_key(client.app, ["*"]))).status_code == 401
    assert (
        client.post("/v1/admin/pools/cpu/drain", headers=bearer(token), json={"reason": "maintenance"}).status_code
        == 200
    )
    resp = client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "pool_draining"
    assert client.post("/v1/admin/pools/cpu/isolate", headers=bearer(token)).status_code == 200
    assert (
        client.post("/v1/chat/completions", json=chat(), headers=bearer(key)).json()["error"]["code"] == "pool_isolated"
    )
    pools = client.get("/v1/admin/pools", headers=bearer(token)).json()["data"]
    assert pools[0]["state"] == "isolated" and pools[0]["telemetry"][0]["memory_total_bytes"] > 0
    assert client.post("/v1/admin/pools/cpu/resume", headers=bearer(token)).status_code == 200
    assert client.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code == 200
    assert client.post("/v1/admin/pools/nope/drain", headers=bearer(token)).status_code == 404


def test_limits_set_and_read_back_through_the_admin_api(make_client):
    client = make_client()
    token = step_up_token(client.app)
    key = make_key(client.app, ["inference"])
    key_id = key.split("-")[1]
    resp = client.put(f"/v1/admin/limits/key:{key_id}", headers=bearer(token), json={"rpm": 1, "reason": "test"})
    assert resp.status_code == 200, resp.text
    assert client.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code == 200
    assert client.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code == 429
    read = client.get(f"/v1/admin/limits/key:{key_id}", headers=bearer(token)).json()
    assert read["limits"] == {"rpm": 1} and read["usage"]["requests"] == 1
    assert client.put("/v1/admin/limits/user:nobody", headers=bearer(token), json={"rpm": 1}).status_code == 404


def test_limit_store_down_fails_closed_except_listed_keys(make_client):
    client = make_client(admission={"store_url": "redis://127.0.0.1:1/0"})
    key = make_key(client.app, ["inference"])
    resp = client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "limiter_unavailable"
    listed = make_key(client.app, ["inference"])
    client.app.state.gatekeeper.settings.fail_open_keys.append(listed.split("-")[1])
    assert client.post("/v1/chat/completions", json=chat(), headers=bearer(listed)).status_code == 200
