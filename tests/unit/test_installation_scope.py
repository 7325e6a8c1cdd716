"""Installation-wide resources answer only to installation roles: every route on one, called by every
organization role (with a fresh second factor), is 403; custom roles can never carry such a permission."""

from __future__ import annotations

import re

import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select

from server.audit.service import Actor
from server.errors import GrantRefused
from server.identity import service
from server.identity.authz import route_permission, route_table
from server.identity.models import Role, UserRole
from server.identity.rbac import (
    BUILTIN_ROLES,
    INSTALLATION_PERMISSIONS,
    ORGANIZATION_PERMISSIONS,
    role_scope,
)
from tests.unit.conftest import MODEL
from tests.unit.tenancy import add_org, add_role, add_user, api_key, app_on, step_up

ORG_ROLES = [r for r in BUILTIN_ROLES if role_scope(r) == "organization"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with app_on("sqlite", tmp_path_factory.mktemp("installation")) as client:
        app = client.app
        org = add_org(app, "tenant")
        add_role(app, org, "everything-org", sorted(ORGANIZATION_PERMISSIONS))
        users = {role: add_user(app, org, f"{role}@t.example", [role]) for role in [*ORG_ROLES, "everything-org"]}
        owner = add_user(app, org, "owner@install.example", ["owner"])
        yield client, org, users, owner


def installation_routes(app) -> list[tuple[str, str, str]]:
    out = []
    for route in app.routes:
        if isinstance(route, APIRoute) and route_permission(route) in INSTALLATION_PERMISSIONS:
            out.extend((method, route.path, route_permission(route)) for method in sorted(route.methods))
    return out


def url_of(path: str) -> str:
    path = path.replace("{name}", "cpu" if path.startswith("/v1/admin/pools") else MODEL)
    return re.sub(r"\{version\}", "v1", path)


def test_installation_routes_are_the_installation_resources(world):
    client = world[0]
    routes = {(m, p) for m, p, _ in installation_routes(client.app)}
    for expected in [
        ("POST", "/v1/admin/pools/{name}/resume"),
        ("POST", "/v1/admin/pools/{name}/isolate"),
        ("GET", "/v1/admin/pools"),
        ("POST", "/v1/admin/signing-keys/rotate"),
        ("POST", "/v1/admin/models/{name}/rollback"),
        ("POST", "/v1/admin/models/{name}/versions/{version}/promote"),
        ("GET", "/v1/admin/models/{name}"),
        ("POST", "/v1/admin/orgs"),
        ("GET", "/metrics"),
    ]:
        assert expected in routes, expected
    table = {(tuple(r["methods"]), r["path"]): r["scope"] for r in route_table(client.app)}
    for method, path, _ in installation_routes(client.app):
        assert table[((method,), path)] == "installation"
    assert table[(("POST",), "/v1/chat/completions")] == "organization"


def test_every_organization_role_is_refused_on_every_installation_route(world):
    client, org, users, owner = world
    failures = []
    for role, user in users.items():
        headers = step_up(client.app, user, org)
        for method, path, permission in installation_routes(client.app):
            resp = client.request(method, url_of(path), headers=headers, json={} if method in ("POST", "PUT") else None)
            if resp.status_code != 403:
                failures.append(f"{role}: {method} {path} ({permission}): {resp.status_code} {resp.text[:100]}")
    assert not failures, "\n".join(failures)


def test_installation_roles_do_get_through(world):
    """The control: the same calls with the owner's step-up token are not refused at the door."""
    client, org, _, owner = world
    headers = step_up(client.app, owner, org)
    for method, path, permission in installation_routes(client.app):
        if path.endswith("/isolate") or path.endswith("/drain"):
            continue  # do not stop the shared pool under the other tests
        resp = client.request(method, url_of(path), headers=headers, json={} if method in ("POST", "PUT") else None)
        assert resp.status_code not in (401, 403) and resp.status_code < 500, (method, path, resp.text[:200])


def test_an_organization_quota_is_an_installation_resource(world):
    client, org, users, owner = world
    body = {"rpm": 100000}
    admin = step_up(client.app, users["admin"], org)
    resp = client.put(f"/v1/admin/limits/org:{org}", headers=admin, json=body)
    assert resp.status_code == 403 and "quota" in resp.json()["error"]["message"]
    # The admin still sets its own users' limits (it holds everything they hold) ...
    assert client.put(f"/v1/admin/limits/user:{users['client']}", headers=admin, json={"rpm": 5}).status_code == 200
    # ... but not the limits of someone who holds more than it does.
    assert client.put(f"/v1/admin/limits/user:{owner}", headers=admin, json={"rpm": 0}).status_code == 403
    assert (
        client.put(f"/v1/admin/limits/org:{org}", headers=step_up(client.app, owner, org), json=body).status_code == 200
    )


def test_no_custom_role_can_hold_an_installation_permission(world):
    client, org, _, owner = world
    owner_headers = step_up(client.app, owner, org)
    for permission in sorted(INSTALLATION_PERMISSIONS):
        resp = client.post("/v1/admin/roles", headers=owner_headers, json={"name": "x", "permissions": [permission]})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "installation_permission", permission
        with pytest.raises(GrantRefused), client.app.state.db.session() as s:  # not even the command line
            service.create_role(s, Actor.system(), org, "y", [permission])


def test_a_smuggled_role_row_grants_no_installation_permission(world):
    """A custom role row that carries an installation permission anyway (written to the database by hand)
    contributes only its organization permissions."""
    client, org, _, _ = world
    user = add_user(client.app, org, "smuggler@t.example", [])
    with client.app.state.db.session() as s:
        role = Role(org_id=org, name="smuggled", permissions=["pools:write", "users:read", "self"], builtin=False)
        s.add(role)
        s.flush()
        s.add(UserRole(user_id=user, role_id=role.id))
        s.add(Role(org_id=org, name="operator", permissions=["pools:write"], builtin=False))
    headers = step_up(client.app, user, org)
    assert client.post("/v1/admin/pools/cpu/resume", headers=headers, json={}).status_code == 403
    assert client.get("/v1/admin/users", headers=headers).status_code == 200
    with client.app.state.db.session() as s:
        fake = s.scalar(select(Role).where(Role.org_id == org, Role.name == "operator"))
        s.add(UserRole(user_id=user, role_id=fake.id))
    client.app.state.authenticator.invalidate()
    me = client.get("/v1/auth/me", headers=headers).json()
    assert "operator" not in me["roles"] and not set(me["permissions"]) & INSTALLATION_PERMISSIONS


def test_registry_internals_and_metrics_need_installation_permissions(world):
    client, org, users, _ = world
    inference = api_key(client.app, users["client"], org, ["inference"])
    assert client.get("/v1/models", headers=inference).status_code == 200  # served models: name, version, digest
    for path in ("/v1/admin/models", f"/v1/admin/models/{MODEL}", f"/v1/admin/models/{MODEL}/versions/v1/bom"):
        assert client.get(path, headers=inference).status_code == 403, path
    admin = step_up(client.app, users["admin"], org)
    assert client.get("/metrics", headers=admin).status_code == 403
    # The organization's own figures come through the admin API instead.
    own = client.get(f"/v1/admin/limits/org:{org}", headers=admin)
    assert own.status_code == 200 and "requests" in own.json()["usage"]
