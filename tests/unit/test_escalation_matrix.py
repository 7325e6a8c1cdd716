"""No escalation, ever: every grant path × every permission the principal does not hold, on SQLite and PostgreSQL.

For every built-in role, a set of hostile custom roles and a narrowly scoped key of an admin, each grant path
(create a key for oneself and for someone else, create a role, assign a role to oneself and to someone else,
create a user with a role) is tried once for every permission the caller does not hold; the sign-in factor
paths are tried with the caller's API key and with a token exchanged for it. Every attempt must be refused
(401/403), each refusal must be one `denied` audit event, and nothing in the database may change.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from server.identity.rbac import BUILTIN_ROLES, INSTALLATION_PERMISSIONS, PERMISSIONS
from tests.unit.tenancy import add_org, add_role, add_user, api_key, app_on, denied_events, snapshot, step_up

HOSTILE_ROLES = {
    "keys-only": ["keys:write"],
    "key-admin": ["keys:write", "keys:admin", "users:read"],
    "user-maker": ["users:write", "users:read"],
    "role-maker": ["roles:write", "roles:read"],
    "role-assigner": ["roles:write", "users:write", "users:read", "keys:write", "self"],
    "almost-admin": ["users:write", "users:read", "keys:admin", "keys:write", "policy:write", "self", "inference"],
}
REFUSALS = {"permission_denied", "grant_exceeds_permissions", "installation_permission", "mfa_step_up_required"}
FACTOR_CHANGES = [
    ("/v1/auth/mfa/enroll", {}),
    ("/v1/auth/mfa/confirm", {"code": "123456"}),
    ("/v1/auth/mfa/recovery-codes", {}),
    ("/v1/auth/password", {"current_password": "whatever it is", "new_password": "an entirely new passphrase 7"}),
]
_emails = itertools.count()


@dataclass
class Caller:
    name: str
    user_id: str
    headers: dict[str, str]
    permissions: frozenset[str]  # effective: what the credential may do
    key_headers: dict[str, str]  # an API key of the same user with the same scopes


class Tenancy:
    def __init__(self, client) -> None:
        self.client = client
        app = client.app
        self.org = add_org(app, "tenant-a")
        add_org(app, "tenant-b")
        # The installation's owner lives in the tenant's organization, as the bootstrap's does in "default".
        self.owner = add_user(app, self.org, "root@install.example", ["owner"])
        self.victim = add_user(app, self.org, "victim@a.example", ["client"])
        for perm in sorted(PERMISSIONS):
            if perm not in INSTALLATION_PERMISSIONS:
                add_role(app, self.org, f"only-{perm.replace(':', '-')}", [perm])
        for name, perms in HOSTILE_ROLES.items():
            add_role(app, self.org, name, perms)
        self.callers: list[Caller] = []
        for role, (_, perms) in BUILTIN_ROLES.items():
            self._caller(role, [role], perms)
        for role, perms in HOSTILE_ROLES.items():
            self._caller(role, [role], frozenset(perms))
        # The tester's key: an admin's key scoped only `keys:write`.
        admin = add_user(app, self.org, "narrow@a.example", ["admin"])
        narrow = api_key(app, admin, self.org, ["keys:write"])
        self.callers.append(Caller("admin-key:keys:write", admin, narrow, frozenset({"keys:write"}), narrow))

    def _caller(self, name: str, roles: list[str], perms: frozenset[str]) -> None:
        app = self.client.app
        user = add_user(app, self.org, f"{name}@a.example", roles)
        self.callers.append(
            Caller(name, user, step_up(app, user, self.org), perms, api_key(app, user, self.org, ["*"]))
        )

    def role_granting(self, perm: str) -> str:
        """A role whose assignment would grant `perm` (custom for organization permissions)."""
        if perm not in INSTALLATION_PERMISSIONS:
            return f"only-{perm.replace(':', '-')}"
        return "operator" if perm in BUILTIN_ROLES["operator"][1] else "owner"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def tenancy(request, tmp_path_factory):
    with app_on(request.param, tmp_path_factory.mktemp(f"escalation-{request.param}")) as client:
        yield Tenancy(client)


def attempts(t: Tenancy, caller: Caller):
    """(description, method, path, headers, body) for every grant of a permission the caller lacks."""
    for perm in sorted(set(PERMISSIONS) - caller.permissions):
        role = t.role_granting(perm)
        email = f"new{next(_emails)}@a.example"
        yield f"key for self with {perm}", "POST", "/v1/admin/keys", {"scopes": [perm]}
        yield f"key for the owner with {perm}", "POST", "/v1/admin/keys", {"scopes": [perm], "user_id": t.owner}
        yield f"role with {perm}", "POST", "/v1/admin/roles", {"name": f"x-{next(_emails)}", "permissions": [perm]}
        yield f"assign {role} to self", "PUT", f"/v1/admin/users/{caller.user_id}/roles", {"roles": [role]}
        yield f"assign {role} to the victim", "PUT", f"/v1/admin/users/{t.victim}/roles", {"roles": [role]}
        yield f"create a user with {role}", "POST", "/v1/admin/users", {"email": email, "roles": [role]}
    if caller.permissions != frozenset(PERMISSIONS):
        yield "key for self with *", "POST", "/v1/admin/keys", {"scopes": ["*"]}
        yield "key for the owner with *", "POST", "/v1/admin/keys", {"scopes": ["*"], "user_id": t.owner}


def test_no_grant_exceeds_the_granter(tenancy):
    t, client = tenancy, tenancy.client
    before, denied_before, tried, failures = snapshot(client.app), denied_events(client.app), 0, []
    for caller in t.callers:
        for what, method, path, body in attempts(t, caller):
            if what == "key for self with *" and caller.name != "admin-key:keys:write":
                continue  # a full session's "*" key for itself grants exactly its own roles: not an escalation
            resp = client.request(method, path, headers=caller.headers, json=body)
            tried += 1
            code = resp.json().get("error", {}).get("code") if resp.status_code >= 400 else None
            if resp.status_code not in (401, 403) or code not in REFUSALS:
                failures.append(f"{caller.name}: {what}: {resp.status_code} {resp.text[:160]}")
    assert not failures, "\n".join(failures)
    assert tried > 1000
    assert snapshot(client.app) == before
    assert denied_events(client.app) - denied_before == tried  # each refusal is one audit event


def test_factor_changes_need_an_interactive_session(tenancy):
    t, client = tenancy, tenancy.client
    before, denied_before, tried = snapshot(client.app), denied_events(client.app), 0
    for caller in t.callers:
        exchanged = client.post(
            "/v1/auth/token", json={"grant_type": "api_key", "api_key": caller.key_headers["Authorization"][7:]}
        )
        assert exchanged.status_code == 200, exchanged.text
        via_token = {"Authorization": f"Bearer {exchanged.json()['access_token']}"}
        for headers in (caller.key_headers, via_token):
            for path, body in FACTOR_CHANGES:
                resp = client.post(path, headers=headers, json=body)
                tried += 1
                assert resp.status_code == 403, (caller.name, path, resp.text)
                assert resp.json()["error"]["code"] in {"interactive_session_required", "permission_denied"}
    assert snapshot(client.app) == before
    assert denied_events(client.app) - denied_before == tried


def test_the_same_grants_within_the_granter_succeed(tenancy):
    """The bounds are not a blanket refusal: an admin can still grant what it holds."""
    t, client = tenancy, tenancy.client
    admin = next(c for c in t.callers if c.name == "admin")
    made = client.post("/v1/admin/keys", headers=admin.headers, json={"scopes": ["inference"], "user_id": t.victim})
    assert made.status_code == 201, made.text
    role = client.post(
        "/v1/admin/roles", headers=admin.headers, json={"name": "ok-role", "permissions": ["audit:read"]}
    )
    assert role.status_code == 201, role.text
    user = client.post(
        "/v1/admin/users", headers=admin.headers, json={"email": "fine@a.example", "roles": ["developer", "ok-role"]}
    )
    assert user.status_code == 201, user.text
    assign = client.put(
        f"/v1/admin/users/{user.json()['id']}/roles", headers=admin.headers, json={"roles": ["auditor"]}
    )
    assert assign.status_code == 200 and assign.json()["roles"] == ["auditor"]


def test_no_key_can_be_taken_over_by_rotation(tenancy):
    """Rotation hands over the key's new secret: only a caller who holds everything that key can do may rotate it."""
    t, client = tenancy, tenancy.client
    app = client.app
    owner_key = api_key(app, t.owner, t.org, ["*"])["Authorization"].split("-")[1]
    admin = next(c for c in t.callers if c.name == "admin")
    key_admin = next(c for c in t.callers if c.name == "key-admin")
    narrow = next(c for c in t.callers if c.name == "admin-key:keys:write")
    wide_sibling = api_key(app, narrow.user_id, t.org, ["*"])["Authorization"].split("-")[1]
    before, denied_before = snapshot(app), denied_events(app)
    for caller, key_id, verb in [
        (admin, owner_key, "rotate"),
        (admin, owner_key, "revoke"),
        (key_admin, owner_key, "rotate"),
        (narrow, wide_sibling, "rotate"),
    ]:
        resp = client.post(f"/v1/admin/keys/{key_id}/{verb}", headers=caller.headers)
        assert resp.status_code == 403, (caller.name, verb, resp.text)
    assert snapshot(app) == before
    assert denied_events(app) - denied_before == 4
    # Revoking one's own key stays possible, whatever it can do.
    assert client.post(f"/v1/admin/keys/{wide_sibling}/revoke", headers=narrow.headers).status_code == 200
