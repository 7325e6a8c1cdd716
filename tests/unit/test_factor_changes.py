"""Sign-in factors (TOTP, recovery codes, password) change only in an interactive session that proved the
account's current factors recently; never with an API key (SQLite file, fake engine)."""

from __future__ import annotations

import time

import pyotp

from server.identity.models import TotpEnrolment, User
from tests.unit.conftest import CHEAP_HASHER
from tests.unit.tenancy import add_org, add_user, api_key

PASSWORD = "granite orchard 31 whistles"
NEW_PASSWORD = "velvet comet 88 lanterns"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def login(client, email: str, password: str = PASSWORD, **extra):
    return client.post("/v1/auth/token", json={"grant_type": "password", "email": email, "password": password, **extra})


def test_an_api_key_cannot_enrol_a_second_factor_for_its_owner(app_client):
    app = app_client.app
    org = add_org(app, "acme")
    user = add_user(app, org, "kim@acme.example", ["admin"], password_hash=CHEAP_HASHER.hash(PASSWORD))
    own = api_key(app, user, org, ["self"])  # the tester's key: scoped to the caller's own account only
    exchanged = app_client.post("/v1/auth/token", json={"grant_type": "api_key", "api_key": own["Authorization"][7:]})
    for headers in (own, bearer(exchanged.json()["access_token"])):
        resp = app_client.post("/v1/auth/mfa/enroll", headers=headers)
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "interactive_session_required"
        resp = app_client.post("/v1/auth/mfa/confirm", headers=headers, json={"code": "123456"})
        assert resp.status_code == 403
    with app.state.db.session() as s:
        assert s.get(TotpEnrolment, user) is None
    assert login(app_client, "kim@acme.example").status_code == 200  # no mfa_required: the owner is not locked out


def test_a_stale_password_session_must_log_in_again(app_client):
    app = app_client.app
    org = add_org(app, "acme")
    user = add_user(app, org, "lee@acme.example", ["developer"], password_hash=CHEAP_HASHER.hash(PASSWORD))
    old = int(time.time()) - app.state.settings.auth.step_up_max_age_seconds - 5
    token, _ = app.state.tokens.issue(sub=user, org=org, scopes=["*"], amr=["pwd"], auth_time=old)
    resp = app_client.post("/v1/auth/mfa/enroll", headers=bearer(token))
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "mfa_step_up_required"
    fresh = login(app_client, "lee@acme.example").json()["access_token"]
    assert app_client.post("/v1/auth/mfa/enroll", headers=bearer(fresh)).status_code == 200


def test_with_a_second_factor_enrolled_changes_need_it(app_client):
    app = app_client.app
    org = add_org(app, "acme")
    add_user(app, org, "max@acme.example", ["developer"], password_hash=CHEAP_HASHER.hash(PASSWORD))
    pwd_only = login(app_client, "max@acme.example").json()["access_token"]
    totp = pyotp.parse_uri(app_client.post("/v1/auth/mfa/enroll", headers=bearer(pwd_only)).json()["provisioning_uri"])
    first = app_client.post("/v1/auth/mfa/confirm", headers=bearer(pwd_only), json={"code": totp.now()})
    codes = first.json()["recovery_codes"]
    # The password-only session from before the enrolment no longer suffices.
    resp = app_client.post("/v1/auth/mfa/recovery-codes", headers=bearer(pwd_only))
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "mfa_step_up_required"
    change = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    assert app_client.post("/v1/auth/password", headers=bearer(pwd_only), json=change).status_code == 401
    stepped = login(app_client, "max@acme.example", totp_code=totp.at(time.time() + 30)).json()["access_token"]
    renewed = app_client.post("/v1/auth/mfa/recovery-codes", headers=bearer(stepped))
    assert renewed.status_code == 200 and set(renewed.json()["recovery_codes"]).isdisjoint(codes)
    assert login(app_client, "max@acme.example", recovery_code=codes[0]).status_code == 401  # old codes are dead
    assert login(app_client, "max@acme.example", recovery_code=renewed.json()["recovery_codes"][0]).status_code == 200


def test_changing_the_password_needs_the_current_one(app_client):
    app = app_client.app
    org = add_org(app, "acme")
    user = add_user(app, org, "ria@acme.example", ["developer"], password_hash=CHEAP_HASHER.hash(PASSWORD))
    token = login(app_client, "ria@acme.example").json()["access_token"]
    wrong = {"current_password": "not my password at all", "new_password": NEW_PASSWORD}
    resp = app_client.post("/v1/auth/password", headers=bearer(token), json=wrong)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "current_password"
    weak = {"current_password": PASSWORD, "new_password": "password1234"}
    assert app_client.post("/v1/auth/password", headers=bearer(token), json=weak).status_code == 400
    with app.state.db.session() as s:
        unchanged = s.get(User, user).password_hash
    ok = app_client.post("/v1/auth/password", headers=bearer(token), json={**wrong, "current_password": PASSWORD})
    assert ok.status_code == 200
    with app.state.db.session() as s:
        assert s.get(User, user).password_hash != unchanged
    assert login(app_client, "ria@acme.example").status_code == 401
    assert login(app_client, "ria@acme.example", NEW_PASSWORD).status_code == 200
    key = api_key(app, user, org, ["*"])
    change = {"current_password": NEW_PASSWORD, "new_password": PASSWORD + " again"}
    assert app_client.post("/v1/auth/password", headers=key, json=change).status_code == 403
