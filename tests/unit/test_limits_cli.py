"""`python -m server limits show|set`: the same limits, audit trail and effect as the admin API."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from server.audit.models import AuditEvent
from server.cli import main
from server.identity import service
from server.settings import load_settings
from tests.policy.redis_support import REDIS_URL, delete_prefix, redis_available
from tests.unit.conftest import build_app, make_key, wait_ready
from tests.unit.test_admission_http import bearer, chat, step_up_token


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """The command line reads its settings from the environment: point it at this test's data directory."""
    monkeypatch.setenv("SERVER_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def client(data_dir):
    # New keys are throttled by default (adaptive limits); these tests check the limits exactly.
    app = build_app(load_settings(engine="fake", admission={"new_key_age_seconds": 0}))
    with TestClient(app) as c:
        wait_ready(app)
        yield c


def limits_cli(capsys, *argv: str) -> tuple[int, dict | str]:
    """Run the command; (0, its JSON) on success, (status, stderr) otherwise."""
    code = main(["limits", *argv, "--json"])
    out = capsys.readouterr()
    return code, json.loads(out.out) if code == 0 else out.err


def audit_events(app, scope: str) -> list[AuditEvent]:
    with app.state.db.session() as s:
        query = select(AuditEvent).where(AuditEvent.action == "limits.set", AuditEvent.target_id == scope)
        return list(s.scalars(query.order_by(AuditEvent.id)))


@pytest.mark.parametrize("kind", ["key", "user", "org"])
def test_set_then_show_round_trip_audited_and_seen_by_the_api(client, capsys, kind):
    app = client.app
    key = make_key(app, ["inference"])
    with app.state.db.session() as s:
        operator = service.operator_account(s)
        ident = {"key": key.split("-")[1], "user": operator.id, "org": operator.org_id}[kind]
        org_id = operator.org_id
    scope = f"{kind}:{ident}"

    code, out = limits_cli(capsys, "set", scope, "--rpm", "50", "--tpd", "100000", "--reason", "first")
    assert code == 0, out
    assert out["limits"] == {"rpm": 50, "tpd": 100000} and out["before"] == {}
    code, out = limits_cli(capsys, "set", scope, "--rpm", "1", "--reason", "tighter")
    assert code == 0, out
    assert out["limits"] == {"rpm": 1} and out["before"] == {"rpm": 50, "tpd": 100000}  # replaces, like PUT

    code, shown = limits_cli(capsys, "show", scope)
    assert code == 0, shown
    assert shown["scope"] == scope and shown["limits"] == {"rpm": 1}
    assert shown["usage"] is None  # memory:// store: the counters live in the server process

    first, second = audit_events(app, scope)
    assert (second.actor_type, second.actor_id, second.outcome, second.org_id) == ("system", "cli", "success", org_id)
    assert second.details["before"] == {"rpm": 50, "tpd": 100000} and second.details["after"] == {"rpm": 1}
    assert second.details["reason"] == "tighter" and first.details["reason"] == "first"

    token = step_up_token(app)
    api = client.get(f"/v1/admin/limits/{scope}", headers=bearer(token)).json()
    assert api["limits"] == shown["limits"]

    # The running server picks the change up on its next poll (forced here instead of waiting for it).
    app.state.authenticator.poll()
    app.state.gatekeeper.refresh()
    assert client.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code == 200
    refused = client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_exceeded"


def test_show_text_output(client, capsys):
    key_id = make_key(client.app, ["inference"]).split("-")[1]
    assert main(["limits", "set", f"key:{key_id}", "--tpm", "900"]) == 0
    assert f"key:{key_id}: tpm=900 (was: none set)" in capsys.readouterr().out
    assert main(["limits", "show", f"key:{key_id}"]) == 0
    text = capsys.readouterr().out
    assert f"key:{key_id}: tpm=900" in text and "memory://" in text


def test_the_api_and_the_cli_write_the_same_way(client, capsys):
    app = client.app
    with app.state.db.session() as s:
        scope = f"org:{service.operator_account(s).org_id}"
    resp = client.put(f"/v1/admin/limits/{scope}", headers=bearer(step_up_token(app)), json={"tpm": 5000})
    assert resp.status_code == 200, resp.text
    code, shown = limits_cli(capsys, "show", scope)
    assert code == 0 and shown["limits"] == {"tpm": 5000}
    (event,) = audit_events(app, scope)
    assert event.details["after"] == {"tpm": 5000} and event.org_id == scope.split(":")[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["show", "team:abc"], "key:<id>, user:<id> or org:<id>"),
        (["show", "key:"], "key:<id>, user:<id> or org:<id>"),
        (["show", "nonsense"], "key:<id>, user:<id> or org:<id>"),
        (["set", "user:nobody", "--rpm", "1"], "not found"),
        (["show", "org:nobody"], "not found"),
    ],
)
def test_bad_scopes_exit_1_with_a_message(data_dir, capsys, argv, message):
    code, err = limits_cli(capsys, *argv)
    assert code == 1 and message in err and err.startswith("error: ")


def test_negative_limits_are_refused_and_nothing_is_written(client, capsys):
    key_id = make_key(client.app, ["inference"]).split("-")[1]
    code, err = limits_cli(capsys, "set", f"key:{key_id}", "--rpm", "-1")
    assert code == 1 and "non-negative" in err
    assert audit_events(client.app, f"key:{key_id}") == []


def test_show_reads_usage_from_a_shared_redis_store(data_dir, monkeypatch, capsys):
    if not redis_available():
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    monkeypatch.setenv("SERVER_ADMISSION__STORE_URL", REDIS_URL)
    app = build_app(load_settings(engine="fake", admission={"store_url": REDIS_URL, "new_key_age_seconds": 0}))
    with TestClient(app) as client:
        wait_ready(app)
        key = make_key(app, ["inference"])
        key_id = key.split("-")[1]
        with app.state.db.session() as s:
            operator = service.operator_account(s)
            scopes = [f"key:{key_id}", f"user:{operator.id}", f"org:{operator.org_id}"]
        try:
            assert client.post("/v1/chat/completions", json=chat(), headers=bearer(key)).status_code == 200
            code, shown = limits_cli(capsys, "show", f"key:{key_id}")
            assert code == 0, shown
            assert shown["usage"]["requests"] == 1 and shown["usage"]["in_flight"] == 0
        finally:
            for scope in scopes:  # this test's scopes only; the shared Redis is never flushed
                delete_prefix(f"sms:lim:s:{scope}:")
