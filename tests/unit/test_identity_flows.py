"""Identity flows end to end through the HTTP API (fake engine): MFA, step-up, rotation, isolation, lockout."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pyotp
import pytest
from starlette.testclient import TestClient

from server.audit.service import Actor
from server.identity import service
from server.identity.apikeys import create_key
from server.identity.login import LoginService, TokenRequest
from server.identity.models import ApiKey
from server.identity.passwords import PasswordHasher
from server.settings import load_settings
from tests.unit.conftest import CHEAP_HASHER, build_app, make_key, wait_ready

PASSWORD = "violet tangerine submarine 1984"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def add_user(app, email: str, roles: list[str], org_id: str | None = None) -> str:
    with app.state.db.session() as s:
        org = org_id or service.operator_account(s).org_id
        return service.create_user(
            s, Actor.system(), org_id=org, email=email, roles=roles, password_hash=CHEAP_HASHER.hash(PASSWORD)
        ).id


def login(client, email: str, **extra) -> dict:
    resp = client.post("/v1/auth/token", json={"grant_type": "password", "email": email, "password": PASSWORD, **extra})
    return {"status": resp.status_code, **resp.json()}


def test_mfa_enrolment_login_and_step_up(app_client):
    app = app_client.app
    add_user(app, "ada@example.com", ["admin"])
    first = login(app_client, "ada@example.com")
    assert first["status"] == 200 and first["expires_in"] <= 900
    token = first["access_token"]
    role = {"name": "readers", "permissions": ["users:read"]}
    # A password-only token is not enough for a privileged action.
    resp = app_client.post("/v1/admin/roles", headers=bearer(token), json=role)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "mfa_step_up_required"
    uri = app_client.post("/v1/auth/mfa/enroll", headers=bearer(token)).json()["provisioning_uri"]
    totp = pyotp.parse_uri(uri)
    assert app_client.post("/v1/auth/mfa/confirm", headers=bearer(token), json={"code": "000000"}).status_code == 400
    codes = app_client.post("/v1/auth/mfa/confirm", headers=bearer(token), json={"code": totp.now()}).json()[
        "recovery_codes"
    ]
    assert len(codes) == 10 and len(set(codes)) == 10
    # Now the password alone is refused; password + TOTP works, and the same code cannot be replayed.
    assert login(app_client, "ada@example.com")["error"]["code"] == "mfa_required"
    time.sleep(0)  # the enrolment code above used the current step; use the next one
    code = totp.at(time.time() + 30)
    ok = login(app_client, "ada@example.com", totp_code=code)
    assert ok["status"] == 200
    assert login(app_client, "ada@example.com", totp_code=code)["error"]["code"] == "invalid_mfa_code"
    me = app_client.get("/v1/auth/me", headers=bearer(ok["access_token"])).json()
    assert "otp" in me["amr"] and me["via"] == "token"
    assert app_client.post("/v1/admin/roles", headers=bearer(ok["access_token"]), json=role).status_code == 201
    # A recovery code works once.
    assert login(app_client, "ada@example.com", recovery_code=codes[0])["status"] == 200
    assert login(app_client, "ada@example.com", recovery_code=codes[0])["status"] == 401


def test_api_key_exchange_for_token_and_scope_narrowing(client):
    app = client.app
    key = make_key(app, ["inference", "metrics:read"])
    resp = client.post("/v1/auth/token", json={"grant_type": "api_key", "api_key": key, "scopes": ["inference"]})
    assert resp.status_code == 200
    token = resp.json()["access_token"]
    assert client.get("/v1/models", headers=bearer(token)).status_code == 200
    assert client.get("/metrics", headers=bearer(token)).status_code == 403
    wider = client.post("/v1/auth/token", json={"grant_type": "api_key", "api_key": key, "scopes": ["admin"]})
    assert wider.status_code == 400


def test_key_rotation_overlap_then_old_secret_dies(app_client):
    app = app_client.app
    app.state.settings.auth.key_rotation_overlap_seconds = 2
    admin = make_key(app, ["admin"])
    old = make_key(app, ["inference"])
    key_id = old.split("-")[1]
    resp = app_client.post(f"/v1/admin/keys/{key_id}/rotate", headers=bearer(admin))
    assert resp.status_code == 200
    new = resp.json()["key"]
    assert new != old and new.startswith(f"sk-{key_id}-")
    assert app_client.get("/v1/models", headers=bearer(old)).status_code == 200  # overlap window
    assert app_client.get("/v1/models", headers=bearer(new)).status_code == 200
    time.sleep(2.2)
    assert app_client.get("/v1/models", headers=bearer(old)).status_code == 401
    assert app_client.get("/v1/models", headers=bearer(new)).status_code == 200


def test_expired_and_revoked_keys_and_case_sensitivity(app_client):
    app = app_client.app
    past = datetime.now(UTC) - timedelta(seconds=1)
    expired = make_key(app, ["inference"], expires_at=past)
    resp = app_client.get("/v1/models", headers=bearer(expired))
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "expired_api_key"
    good = make_key(app, ["inference"])
    assert app_client.get("/v1/models", headers=bearer(good)).status_code == 200
    assert app_client.get("/v1/models", headers=bearer(good.upper())).status_code == 401
    assert (
        app_client.get("/v1/models", headers=bearer(good[:-1] + ("A" if good[-1] != "A" else "B"))).status_code == 401
    )
    assert app_client.get("/v1/models", headers=bearer(good + "' OR '1'='1")).status_code == 401
    admin = make_key(app, ["admin"])
    app_client.post(f"/v1/admin/keys/{good.split('-')[1]}/revoke", headers=bearer(admin))
    assert app_client.get("/v1/models", headers=bearer(good)).status_code == 401


def test_org_isolation(app_client):
    app = app_client.app
    with app.state.db.session() as s:
        other = service.create_org(s, Actor.system(), "other-org")
        other_id = other.id
    home_admin = make_key(app, ["*"])  # operator service account: admin of the home org
    with app.state.db.session() as s:
        b_admin = service.create_user(s, Actor.system(), org_id=other_id, email="b@other.example", roles=["admin"])
        _, b_key = create_key(s, app.state.keyring.mac, org_id=other_id, user_id=b_admin.id, name="b", scopes=["*"])
        home_user = service.operator_account(s).id
        home_key_id = s.query(ApiKey).filter(ApiKey.user_id == home_user).first().id
    h = bearer(b_key)
    assert app_client.get(f"/v1/admin/users/{home_user}", headers=h).status_code == 404
    listed = app_client.get("/v1/admin/users", headers=h).json()["data"]
    assert {u["org_id"] for u in listed} == {other_id}
    assert app_client.get("/v1/admin/users", params={"org_id": "anything"}, headers=h).status_code == 403
    assert app_client.post(f"/v1/admin/keys/{home_key_id}/revoke", headers=h).status_code == 404
    events = app_client.get("/v1/admin/audit", headers=h).json()["data"]
    assert all(e["org_id"] == other_id for e in events)
    # The home org's admin cannot reach into the other org either.
    assert app_client.get(f"/v1/admin/users/{b_admin.id}", headers=bearer(home_admin)).status_code == 404


def test_password_lockout_per_email_and_per_address(app_client):
    app = app_client.app
    add_user(app, "eve@example.com", ["developer"])
    for throttle in (app.state.login.lockout.account, app.state.login.lockout.address):
        throttle.base_seconds = 60.0  # locks outlast the test on a slow machine

    def attempts(email: str, n: int = 7) -> list[int]:
        return [
            app_client.post(
                "/v1/auth/token",
                json={"grant_type": "password", "email": email, "password": "wrong password guess 123"},
            ).status_code
            for _ in range(n)
        ]

    known = attempts("eve@example.com")
    assert known[:5] == [401] * 5 and known[5:] == [429, 429]
    # The account is locked, not yet the address (it locks later: 10 failures by default, 5 counted so far).
    assert attempts("nobody@example.com", 5) == [401] * 5
    assert attempts("someone@example.com", 2) == [429, 429]  # the address counts failures of every account
    with app.state.db.session() as s:
        app.state.login.lockout.address.record_success(s, ["addr:testclient"])
    # An unknown account locks exactly like a known one: lockout reveals nothing about existence.
    assert attempts("nobody2@example.com") == known
    resp = app_client.post(
        "/v1/auth/token", json={"grant_type": "password", "email": "eve@example.com", "password": PASSWORD}
    )
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1


def test_login_timing_unknown_user_vs_wrong_password(tmp_path):
    """Median over 50 tries each differs by < 10%: an unknown email costs a dummy argon2 verification."""
    from server.identity.lockout import LoginLockout, LoginThrottle
    from server.identity.passwords import PasswordHasher as Hasher

    settings = load_settings(data_dir=tmp_path, engine="fake")
    hasher = Hasher(time_cost=1, memory_cost=16384, parallelism=1)
    app = build_app(settings)
    with TestClient(app):
        wait_ready(app)
        with app.state.db.session() as s:
            org = service.operator_account(s).org_id
            service.create_user(
                s,
                Actor.system(),
                org_id=org,
                email="t@example.com",
                roles=["developer"],
                password_hash=hasher.hash(PASSWORD),
            )
        state = app.state
        never = LoginThrottle(threshold=10_000, base_seconds=1, max_seconds=1)
        no_lockout = LoginLockout(never, never)
        svc = LoginService(state.db, hasher, no_lockout, state.totp, state.tokens, settings.auth, state.audit_sink)
        actor = Actor(type="anonymous", client_addr="198.51.100.7")

        def attempt(email: str) -> float:
            started = time.perf_counter()
            with pytest.raises(Exception) as info:
                svc.for_password(TokenRequest(grant_type="password", email=email, password="not the password"), actor)
            assert getattr(info.value, "code", None) == "invalid_credentials"
            return time.perf_counter() - started

        samples = {"unknown": [], "wrong": []}
        for _ in range(50):  # interleaved so drift on the machine hits both
            samples["unknown"].append(attempt("ghost@example.com"))
            samples["wrong"].append(attempt("t@example.com"))
    unknown, wrong = statistics.median(samples["unknown"]), statistics.median(samples["wrong"])
    print(f"\nlogin median: unknown user {unknown * 1000:.2f} ms, wrong password {wrong * 1000:.2f} ms")
    assert abs(unknown - wrong) / max(unknown, wrong) < 0.10


def test_cli_bootstrap_once_keys_and_routes(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{tmp_path}"\nengine = "fake"\n')

    def cli(*argv):
        return subprocess.run(
            [sys.executable, "-m", "server", "--config", str(config), *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = cli("admin", "bootstrap", "--email", "root@example.com", "--json")
    assert first.returncode == 0, first.stderr
    boot = json.loads(first.stdout)
    assert (
        boot["password"]
        and boot["totp_provisioning_uri"].startswith("otpauth://")
        and len(boot["recovery_codes"]) == 10
    )
    again = cli("admin", "bootstrap", "--email", "root2@example.com")
    assert again.returncode == 1 and "already exists" in again.stderr
    made = cli("keys", "create", "--scopes", "inference,watermark:detect", "--json")
    key = json.loads(made.stdout)
    assert key["key"].startswith("sk-") and key["user_id"] == boot["operator_service_account"]
    listed = cli("keys", "list", "--json")
    assert key["key"] not in listed.stdout and key["id"] in listed.stdout
    bad = cli("keys", "create", "--scopes", "telepathy")
    assert bad.returncode == 1 and "unknown scope" in bad.stderr
    assert cli("keys", "revoke", key["id"]).returncode == 0
    routes = json.loads(cli("routes", "--json").stdout)
    assert all(r["permission"] for r in routes)
    assert {"path": "/healthz", "methods": ["GET"], "permission": "public", "scope": "public"} in routes
    by_path = {(r["path"], tuple(r["methods"])): r for r in routes}
    assert by_path[("/v1/admin/pools/{name}/resume", ("POST",))]["scope"] == "installation"
    assert by_path[("/v1/admin/signing-keys/rotate", ("POST",))]["scope"] == "installation"
    assert by_path[("/v1/admin/keys", ("POST",))]["scope"] == "organization"
    text = cli("routes").stdout
    assert any(line.split()[-1] == "installation" and "/v1/admin/orgs" in line for line in text.splitlines())


def test_production_refuses_placeholder_secret(tmp_path):
    from server.identity.secrets import InsecureSecret, load_master_secret

    with pytest.raises(InsecureSecret):
        load_master_secret(load_settings(data_dir=tmp_path, environment="production"))
    with pytest.raises(InsecureSecret):
        load_master_secret(load_settings(data_dir=tmp_path, auth={"secret_key": "changeme"}))


def test_cheap_hasher_is_only_for_tests():
    assert PasswordHasher().hash("x" * 16).startswith("$argon2id$v=19$m=19456,t=2,p=1$")
