"""Every route × every kind of credential, on SQLite and PostgreSQL: each cell the expected status."""

from __future__ import annotations

import base64
import json
import re
import time

import pyotp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.routing import APIRoute
from starlette.testclient import TestClient

from server.identity import service
from server.identity.apikeys import create_key, revoke_key
from server.identity.authz import route_permission
from server.identity.models import ApiKey, TotpEnrolment
from server.identity.rbac import BUILTIN_ROLES, PUBLIC, STEP_UP, expand_scopes
from server.identity.tokens import TokenService
from server.settings import load_settings
from tests.storage_backends import fresh_postgres_database, postgres_available
from tests.unit.conftest import CHEAP_HASHER, MODEL, build_app, wait_ready

ROLES = list(BUILTIN_ROLES)
# The victim key in the path belongs to another user: acting on it needs more than the route's permission.
ON_OTHERS = {
    ("POST", "/v1/admin/keys/{key_id}/rotate"): ("keys:admin", True),
    ("POST", "/v1/admin/keys/{key_id}/revoke"): ("keys:admin", False),
}
PASSWORD = "correct horse battery staple 42"
# Routes that change the caller's own sign-in factors: an API key (or a token exchanged for one) is refused
# whatever its scopes (403 interactive_session_required). Bodies are well-formed so the check is reached.
FACTOR_ROUTES = {
    ("POST", "/v1/auth/mfa/enroll"): {},
    ("POST", "/v1/auth/mfa/confirm"): {"code": "000000"},
    ("POST", "/v1/auth/mfa/recovery-codes"): {},
    ("POST", "/v1/auth/password"): {"current_password": "not it", "new_password": "a new passphrase 2 remember"},
}


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class World:
    """An app with one user per role (password + TOTP), keys and tokens for each, and bad credentials."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        app = client.app
        self.creds: dict[str, tuple[str | None, set[str] | None, bool]] = {}  # name -> (header, perms, mfa)
        with app.state.db.session() as s:
            op = service.operator_account(s)
            self.org = op.org_id
            users = {}
            for role in ROLES:
                user = service.create_user(
                    s,
                    _system(),
                    org_id=self.org,
                    email=f"{role}@a.example",
                    roles=[role],
                    password_hash=CHEAP_HASHER.hash(PASSWORD),
                )
                users[role] = user.id
            victim = service.create_user(s, _system(), org_id=self.org, email="victim@a.example", roles=["client"])
            self.victim_user = victim.id
            row, _ = create_key(
                s, app.state.keyring.mac, org_id=self.org, user_id=victim.id, name="victim", scopes=["inference"]
            )
            self.victim_key = row.id
        self.totp = {}
        for role, user_id in users.items():
            with app.state.db.session() as s:
                uri = app.state.totp.enroll(s, user_id, f"{role}@a.example")
                s.get(TotpEnrolment, user_id).confirmed_at = s.get(TotpEnrolment, user_id).created_at
                app.state.totp.regenerate_recovery_codes(s, user_id)
            self.totp[role] = pyotp.parse_uri(uri)
            with app.state.db.session() as s:
                _, key = create_key(s, app.state.keyring.mac, org_id=self.org, user_id=user_id, name=role, scopes=["*"])
            perms = set(BUILTIN_ROLES[role][1])
            self.creds[f"key:{role}"] = (f"Bearer {key}", perms, False)
            self.creds[f"token:{role}"] = (f"Bearer {self.login(role)}", perms, True)
        with app.state.db.session() as s:
            dev = users["developer"]
            _, narrow = create_key(
                s, app.state.keyring.mac, org_id=self.org, user_id=dev, name="narrow", scopes=["finetune"]
            )
            row, revoked = create_key(
                s, app.state.keyring.mac, org_id=self.org, user_id=dev, name="revoked", scopes=["*"]
            )
            revoke_key(s, s.get(ApiKey, row.id))
        app.state.authenticator.poll()
        self.creds["key:without-scope"] = (
            f"Bearer {narrow}",
            set(BUILTIN_ROLES["developer"][1]) & set(expand_scopes(["finetune"])),
            False,
        )
        self.creds["key:revoked"] = (f"Bearer {revoked}", None, False)
        self.creds["none"] = (None, None, False)
        for i, header in enumerate(["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "sk-abc", "Bearer sk-nope"]):
            self.creds[f"malformed:{i}"] = (header, None, False)
        tokens: TokenService = app.state.tokens
        auth = app.state.settings.auth
        past = TokenService(app.state.db, app.state.keyring, auth, clock=lambda: time.time() - 3600)
        expired, _ = past.issue(
            sub=users["admin"], org=self.org, scopes=["*"], amr=["pwd", "otp"], auth_time=int(time.time()) - 3600
        )
        self.creds["token:expired"] = (f"Bearer {expired}", None, False)
        other_aud = TokenService(app.state.db, app.state.keyring, auth.model_copy(update={"audience": "elsewhere"}))
        foreign, _ = other_aud.issue(
            sub=users["admin"], org=self.org, scopes=["*"], amr=["pwd", "otp"], auth_time=int(time.time())
        )
        self.creds["token:other-audience"] = (f"Bearer {foreign}", None, False)
        good, _ = tokens.issue(
            sub=users["admin"], org=self.org, scopes=["*"], amr=["pwd", "otp"], auth_time=int(time.time())
        )
        header, payload, _sig = good.split(".")
        kid = json.loads(base64.urlsafe_b64decode(header + "=="))["kid"]
        self.creds["token:alg-none"] = (
            f"Bearer {b64({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{payload}.",
            None,
            False,
        )
        stranger = Ed25519PrivateKey.generate()
        import jwt

        unknown = jwt.encode(
            json.loads(base64.urlsafe_b64decode(payload + "==")),
            stranger,
            algorithm="EdDSA",
            headers={"kid": "not-a-known-kid"},
        )
        self.creds["token:unknown-key"] = (f"Bearer {unknown}", None, False)
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        claims["org"] = "org_someone_else"
        self.creds["token:tampered"] = (f"Bearer {header}.{b64(claims)}.{_sig}", None, False)

    def login(self, role: str) -> str:
        code = self.totp[role].now()
        resp = self.client.post(
            "/v1/auth/token",
            json={"grant_type": "password", "email": f"{role}@a.example", "password": PASSWORD, "totp_code": code},
        )
        assert resp.status_code == 200, resp.text
        return resp.json()["access_token"]


def _system():
    from server.audit.service import Actor

    return Actor.system()


def _routes(app) -> list[tuple[str, str, str]]:
    out = []
    for route in app.routes:
        if isinstance(route, APIRoute):
            for method in sorted(route.methods):
                out.append((method, route.path, route_permission(route)))
    return out


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def world(request, tmp_path_factory):
    data = tmp_path_factory.mktemp(f"matrix-{request.param}")
    if request.param == "postgresql":
        if not postgres_available():
            pytest.fail("PostgreSQL on 127.0.0.1:5432 is not reachable; .ci/run starts it")
        ctx = fresh_postgres_database()
        url = ctx.__enter__()
    else:
        ctx, url = None, f"sqlite:///{data / 'matrix.db'}"
    app = build_app(load_settings(data_dir=data, engine="fake", database_url=url))
    with TestClient(app) as client:
        wait_ready(app)
        yield World(client)
    if ctx is not None:
        ctx.__exit__(None, None, None)


def test_every_route_declares_a_permission(world):
    for method, path, permission in _routes(world.client.app):
        assert permission is not None, f"{method} {path} has no permission declaration"


def test_route_credential_matrix(world):
    client = world.client
    failures = []
    for method, path, permission in _routes(client.app):
        url = re.sub(r"\{user_id\}", world.victim_user, path)
        url = re.sub(r"\{key_id\}", world.victim_key, url)
        url = re.sub(r"\{model_id(:path)?\}", MODEL, url)
        for name, (header, perms, mfa) in world.creds.items():
            headers = {"Authorization": header} if header is not None else {}
            body = FACTOR_ROUTES.get((method, path), {}) if method in ("POST", "PUT") else None
            resp = client.request(method, url, headers=headers, json=body)
            status = resp.status_code
            if permission == PUBLIC:
                ok = status not in (401, 403) and status < 500
                want = "not 401/403"
            elif perms is None:
                ok, want = status == 401, "401"
            elif permission not in perms:
                ok, want = status == 403, "403"
            elif (method, path) in FACTOR_ROUTES and name.startswith("key:"):
                ok = status == 403 and resp.json()["error"]["code"] == "interactive_session_required"
                want = "403 interactive_session_required"
            elif (method, path) in ON_OTHERS and ON_OTHERS[(method, path)][0] not in perms:
                ok, want = status == 403, "403 (another user's key)"
            elif (permission in STEP_UP or ON_OTHERS.get((method, path), ("", False))[1]) and not mfa:
                ok = status == 401 and resp.json()["error"]["code"] == "mfa_step_up_required"
                want = "401 mfa_step_up_required"
            else:
                ok, want = status not in (401, 403) and status < 500, "allowed"
            if not ok:
                failures.append(f"{method} {path} as {name}: got {status}, want {want}: {resp.text[:120]}")
            if status >= 400:
                assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert not failures, "\n".join(failures)


def test_denials_and_failures_are_audited(world):
    client = world.client
    header = world.creds["token:auditor"][0]
    client.get("/v1/admin/users", headers={"Authorization": world.creds["key:client"][0]})
    owner = world.creds["token:owner"][0]
    # Failed authentications are tallied and written once per interval (here: now).
    client.app.state.audit_sink.flush(failures=True)
    # Anonymous failures belong to no organization: only the installation's owner sees them.
    for action, outcome, who in (
        ("authz", "denied", header),
        ("auth.login", "success", header),
        ("authn", "failure", owner),
    ):
        resp = client.get("/v1/admin/audit", params={"action": action}, headers={"Authorization": who})
        assert resp.status_code == 200
        assert any(e["outcome"] == outcome for e in resp.json()["data"]), (action, outcome)
    failures = client.get("/v1/admin/audit", params={"action": "authn"}, headers={"Authorization": owner}).json()
    tallied = [e for e in failures["data"] if e["outcome"] == "failure"]
    assert all(e["details"]["aggregated"] and e["details"]["count"] >= 1 for e in tallied)
    # The matrix sent every bad credential to every protected route: far more failures than rows.
    assert sum(e["details"]["count"] for e in tallied) > len(tallied)
