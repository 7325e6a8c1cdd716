"""Watermark keys and exemptions through the admin API, and the request path that applies them
(`RequestMarker`): step-up, org isolation, audit, no key material anywhere, the header never lies."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from server.engine.fake import FakeEngine
from server.engine.types import GenerationRequest, ModelInfo, SamplingOptions
from server.identity import service
from server.identity.apikeys import create_key
from server.identity.principal import Principal
from server.watermark.marking import RequestMarker
from server.watermark.request import parse_wm
from tests.watermark.conftest import MODEL, fake_app


def _info() -> ModelInfo:
    return ModelInfo(MODEL, "v1", hashlib.sha256(b"m").hexdigest(), Path("."), 512, "cpu", 1_700_000_000)


@pytest.fixture
def app(tmp_path):
    app = fake_app(tmp_path)
    with TestClient(app) as client:
        app.state.client = client
        yield app


def _admin(app, *, mfa: bool) -> tuple[dict[str, str], str, str]:
    """Headers of an admin token of the operator's organization, its org id and an API key id there."""
    with app.state.db.session() as session:
        user = service.operator_account(session)
        key, _ = create_key(session, app.state.keyring.mac, org_id=user.org_id, user_id=user.id, name="k", scopes=["*"])
        org_id, user_id, key_id = user.org_id, user.id, key.id
    token, _ = app.state.tokens.issue(
        sub=user_id, org=org_id, scopes=["*"], amr=["pwd", "otp"] if mfa else ["pwd"], auth_time=int(time.time())
    )
    return {"Authorization": f"Bearer {token}"}, org_id, key_id


def test_rotation_and_exemption_need_step_up_and_are_audited(app):
    client = app.state.client
    plain, _, key_id = _admin(app, mfa=False)
    stepped, org_id, _ = _admin(app, mfa=True)
    paths = (("POST", "/v1/admin/watermark/keys/rotate"), ("PUT", f"/v1/admin/watermark/exemptions/{key_id}"))
    for method, path in paths:
        resp = client.request(method, path, headers=plain, json={"reason": "x"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "mfa_step_up_required"

    rotated = client.post("/v1/admin/watermark/keys/rotate", headers=stepped, json={"reason": "org key"})
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["org_id"] == org_id and rotated.json()["key_id"].startswith("wk_")
    assert client.put(f"/v1/admin/watermark/exemptions/{key_id}", headers=stepped, json={}).status_code == 400
    done = client.put(f"/v1/admin/watermark/exemptions/{key_id}", headers=stepped, json={"reason": "baseline"})
    assert done.status_code == 200 and done.json()["exempt"] is True

    state = client.get("/v1/admin/watermark", headers=plain)
    assert state.status_code == 200
    body = state.json()
    assert [e["api_key_id"] for e in body["exemptions"]] == [key_id]
    ours = [k for k in body["keys"] if k["org_id"] == org_id]
    assert len(ours) == 1 and ours[0]["key_id"] == rotated.json()["key_id"] and ours[0]["status"] == "active"
    assert any(k["org_id"] is None for k in body["keys"])  # the deployment default
    fields = {"key_id", "org_id", "scheme", "params", "status", "created_at", "retired_at"}
    assert all(set(k) == fields for k in body["keys"])  # metadata only, never key material

    audit = client.get("/v1/admin/audit", headers=plain, params={"action": "watermark.exempt"}).json()["data"]
    assert audit and audit[0]["target_id"] == key_id
    created = client.get("/v1/admin/audit", headers=plain, params={"action": "watermark.key.create"}).json()["data"]
    assert rotated.json()["key_id"] in [e["target_id"] for e in created]

    undo = client.request("DELETE", f"/v1/admin/watermark/exemptions/{key_id}", headers=stepped)
    assert undo.status_code == 200 and undo.json()["exempt"] is False
    assert client.get("/v1/admin/watermark", headers=plain).json()["exemptions"] == []


def test_an_org_admin_cannot_touch_other_orgs_or_the_default_key(app):
    client = app.state.client
    stepped, _, _ = _admin(app, mfa=True)
    with app.state.db.session() as session:
        from server.audit.service import Actor

        other = service.create_org(session, Actor.system(), "other")
        user = service.create_user(session, Actor.system(), org_id=other.id, email="o@example.com", roles=["admin"])
        foreign, _ = create_key(session, app.state.keyring.mac, org_id=other.id, user_id=user.id, name="f", scopes=[])
        other_id, foreign_id = other.id, foreign.id
    resp = client.put(f"/v1/admin/watermark/exemptions/{foreign_id}", headers=stepped, json={"reason": "x"})
    assert resp.status_code == 404
    resp = client.post("/v1/admin/watermark/keys/rotate", headers=stepped, json={"org_id": other_id})
    assert resp.status_code == 404
    resp = client.post("/v1/admin/watermark/keys/rotate", headers=stepped, json={"org_id": None})
    assert resp.status_code == 403  # the deployment default belongs to the installation's owner
    assert app.state.watermark_keys.is_exempt(foreign_id) is False


class _MarkingEngine(FakeEngine):
    applies_watermark = True


def test_request_marker_sets_a_sealed_watermark_and_an_honest_header(app):
    keys = app.state.watermark_keys
    _, org_id, key_id = _admin(app, mfa=False)
    principal = Principal(
        user_id="u", org_id=org_id, roles=(), permissions=frozenset(), via="api_key", scopes=(), amr=(),
        auth_time=0, api_key_id=key_id,
    )  # fmt: skip
    gens = [GenerationRequest("r", [1, 2, 3], SamplingOptions(max_tokens=4, temperature=0.7))]
    marker = RequestMarker(keys)

    marked, header = asyncio.run(marker.mark(principal, _MarkingEngine(_info()), gens))
    default = keys.active_key_for(None)
    wm = parse_wm(marked[0].options.extra_args)
    assert wm is not None and wm.key_id == default.key_id and wm.key == default.key and wm.temperature == 0.7
    assert header == {"X-Watermark": f"gumbel; key-id={default.key_id}"}  # auto, sampled: Gumbel in the sampler
    assert default.key.hex() not in str(marked[0].options.extra_args)  # sealed, never in the clear
    assert gens[0].options.extra_args == {}  # the caller's request is not mutated

    greedy = [GenerationRequest("g", [1, 2, 3], SamplingOptions(max_tokens=4, temperature=0.0))]
    marked, header = asyncio.run(marker.mark(principal, _MarkingEngine(_info()), greedy))
    wm = parse_wm(marked[0].options.extra_args)
    assert header == {"X-Watermark": f"kgw-gated; key-id={default.key_id}"}  # auto, greedy: confidence-gated KGW
    assert wm is not None and wm.gate == default.gate > 0 and wm.warmup == default.warmup

    # An engine that does not apply watermarks never claims one.
    off_engine = {"X-Watermark": "off; reason=engine"}
    assert asyncio.run(marker.mark(principal, FakeEngine(_info()), gens)) == (gens, off_engine)

    from server.audit.service import Actor

    keys.exempt(key_id, Actor.system(), "test")
    unmarked, header = asyncio.run(marker.mark(principal, _MarkingEngine(_info()), gens))
    assert unmarked == gens and header == {"X-Watermark": "off; reason=exempt"}


def test_fake_engine_responses_say_off(app):
    client = app.state.client
    with app.state.db.session() as session:
        user = service.operator_account(session)
        mac, org = app.state.keyring.mac, user.org_id
        _, key = create_key(session, mac, org_id=org, user_id=user.id, name="i", scopes=["inference"])
    deadline = time.time() + 10
    while not app.state.hub.ready() and time.time() < deadline:
        time.sleep(0.01)
    resp = client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert resp.status_code == 200 and resp.headers["x-watermark"] == "off; reason=engine"
