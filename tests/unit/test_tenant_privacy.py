"""Least information across tenants: an address in another organization is indistinguishable from a new one,
installation accounts' addresses cannot be claimed, and a login names its organization when it must."""

from __future__ import annotations

import pytest

from server.identity import service
from tests.unit.conftest import CHEAP_HASHER
from tests.unit.tenancy import add_org, add_user, app_on, step_up

PASSWORD = "marble staircase 19 evenings"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def world(request, tmp_path):
    with app_on(request.param, tmp_path) as client:
        app = client.app
        a, b = add_org(app, "org-a"), add_org(app, "org-b")
        owner = add_user(app, a, "root@install.example", ["owner"], password_hash=CHEAP_HASHER.hash(PASSWORD))
        admin_a = add_user(app, a, "admin@a.example", ["admin"])
        admin_b = add_user(app, b, "admin@b.example", ["admin"])
        add_user(app, a, "shared@example.com", ["developer"], password_hash=CHEAP_HASHER.hash(PASSWORD))
        yield client, {"a": a, "b": b}, {"owner": owner, "a": admin_a, "b": admin_b}


def create(client, headers, email: str):
    body = {"email": email, "password": PASSWORD + " b", "roles": ["developer"]}
    return client.post("/v1/admin/users", headers=headers, json=body)


def test_an_address_of_another_organization_is_like_a_new_one(world):
    client, orgs, admins = world
    as_b = step_up(client.app, admins["b"], orgs["b"])
    taken = create(client, as_b, "shared@example.com")  # exists in org A
    fresh = create(client, as_b, "nobody-yet@example.com")
    assert taken.status_code == fresh.status_code == 201
    assert set(taken.json()) == set(fresh.json()) and taken.json()["org_id"] == orgs["b"]
    # Within one organization an address is still unique.
    again = create(client, as_b, "shared@example.com")
    assert again.status_code == 409 and "this organization" in again.json()["error"]["message"]


def test_installation_accounts_addresses_cannot_be_claimed(world):
    client, orgs, admins = world
    as_b = step_up(client.app, admins["b"], orgs["b"])
    for email in ("root@install.example", "ROOT@install.example ", service.OPERATOR_EMAIL):
        resp = create(client, as_b, email)
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "email_reserved", email
    # So the owner's login stays unambiguous.
    body = {"grant_type": "password", "email": "root@install.example", "password": PASSWORD}
    assert client.post("/v1/auth/token", json=body).status_code == 200


def test_a_login_names_its_organization_when_an_address_is_in_several(world):
    client, orgs, admins = world
    as_b = step_up(client.app, admins["b"], orgs["b"])
    assert create(client, as_b, "shared@example.com").status_code == 201  # B's password: PASSWORD + " b"
    body = {"grant_type": "password", "email": "shared@example.com", "password": PASSWORD}
    ambiguous = client.post("/v1/auth/token", json=body)
    unknown = client.post("/v1/auth/token", json={**body, "email": "ghost@example.com"})
    # Exactly as an unknown address: the message says what to do, whoever asks.
    assert ambiguous.status_code == unknown.status_code == 401
    assert ambiguous.json() == unknown.json() and "organization" in ambiguous.json()["error"]["message"]
    as_a = client.post("/v1/auth/token", json={**body, "organization": "org-a"})
    assert as_a.status_code == 200
    as_b_login = client.post("/v1/auth/token", json={**body, "password": PASSWORD + " b", "organization": orgs["b"]})
    assert as_b_login.status_code == 200
    me_a = client.get("/v1/auth/me", headers={"Authorization": f"Bearer {as_a.json()['access_token']}"}).json()
    me_b = client.get("/v1/auth/me", headers={"Authorization": f"Bearer {as_b_login.json()['access_token']}"}).json()
    assert (me_a["org_id"], me_b["org_id"]) == (orgs["a"], orgs["b"])
    # The other organization's password does not open this one.
    wrong = client.post("/v1/auth/token", json={**body, "password": PASSWORD + " b", "organization": "org-a"})
    assert wrong.status_code == 401


def test_an_organization_admin_sees_only_its_own_organization(world):
    client, orgs, admins = world
    as_a = step_up(client.app, admins["a"], orgs["a"])
    listed = client.get("/v1/admin/orgs", headers=as_a).json()["data"]
    assert [o["id"] for o in listed] == [orgs["a"]]
    assert client.post("/v1/admin/orgs", headers=as_a, json={"name": "squat"}).status_code == 403
    # The owner's account lives in org A, but org A's admin cannot act on it.
    assert client.post(f"/v1/admin/users/{admins['owner']}/disable", headers=as_a).status_code == 403
    assert client.put(f"/v1/admin/users/{admins['owner']}/roles", headers=as_a, json={"roles": []}).status_code == 403


def test_an_installation_role_needs_an_address_no_other_organization_uses(world):
    client, orgs, admins = world
    as_b = step_up(client.app, admins["b"], orgs["b"])
    twin = create(client, as_b, "shared@example.com").json()["id"]  # the same address as a user of org A
    as_owner = step_up(client.app, admins["owner"], orgs["a"])
    resp = client.put(f"/v1/admin/users/{twin}/roles", headers=as_owner, json={"roles": ["operator"]})
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "email_not_unique"
    made = client.post(
        "/v1/admin/users",
        headers=as_owner,
        json={"email": "admin@a.example", "roles": ["operator"], "org_id": orgs["b"]},  # org A has it
    )
    assert made.status_code == 409 and made.json()["error"]["code"] == "email_not_unique"
    unique = client.post(
        "/v1/admin/users", headers=as_owner, json={"email": "ops@install.example", "roles": ["operator"]}
    )
    assert unique.status_code == 201, unique.text
    # ... and from then on that address is reserved for tenants.
    assert create(client, as_b, "ops@install.example").json()["error"]["code"] == "email_reserved"
