"""The per-address login throttle cannot be turned against other people (HTTP, fake engine, SQLite file).

The server sits behind a trusted proxy here, so each test picks real client addresses with X-Forwarded-For.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pyotp
import pytest
from starlette.testclient import TestClient

from server.identity.models import TotpEnrolment
from server.settings import load_settings
from tests.unit.conftest import CHEAP_HASHER, build_app, wait_ready
from tests.unit.tenancy import add_org, add_user

PASSWORD = "copper kettle 42 on the stove"
OFFICE = "198.51.100.50"  # one NAT address shared by everyone in an office


@pytest.fixture
def server(tmp_path):
    settings = load_settings(
        data_dir=tmp_path,
        engine="fake",
        network={"trusted_proxies": ["127.0.0.1"]},
        auth={"lockout_address_threshold": 10, "lockout_threshold": 5},
    )
    app = build_app(settings)
    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        wait_ready(app)
        org = add_org(app, "office")
        client.org = org
        yield client


def user(client, email: str, *, mfa: bool = False) -> pyotp.TOTP | None:
    app = client.app
    user_id = add_user(app, client.org, email, ["developer"], password_hash=CHEAP_HASHER.hash(PASSWORD))
    if not mfa:
        return None
    with app.state.db.session() as s:
        uri = app.state.totp.enroll(s, user_id, email)
        s.get(TotpEnrolment, user_id).confirmed_at = datetime.now(UTC)
    return pyotp.parse_uri(uri)


def login(client, email: str, address: str, password: str = PASSWORD, **extra) -> int:
    body = {"grant_type": "password", "email": email, "password": password, **extra}
    return client.post("/v1/auth/token", json=body, headers={"X-Forwarded-For": address}).status_code


def spray(client, address: str, n: int, start: int = 0) -> list[int]:
    return [login(client, f"target{start + i}@office.example", address, "guess guess guess 1") for i in range(n)]


def test_a_locked_address_still_admits_an_account_that_proves_its_second_factor(server):
    alice = user(server, "alice@office.example", mfa=True)
    user(server, "bob@office.example")
    assert spray(server, OFFICE, 10) == [401] * 10  # Mallory, from the office's address
    assert spray(server, OFFICE, 1, start=10) == [429]
    assert login(server, "alice@office.example", OFFICE, totp_code=alice.now()) == 200
    # Without its second factor, an account from the locked address waits (documented).
    assert login(server, "bob@office.example", OFFICE) == 429
    # A guess with a made-up code costs a failure and learns nothing: 429 whether or not the password was right.
    assert login(server, "alice@office.example", OFFICE, totp_code="000000") == 429
    assert login(server, "alice@office.example", OFFICE, "wrong password here 1", totp_code="000000") == 429
    # Everyone elsewhere is unaffected.
    assert login(server, "bob@office.example", "192.0.2.8") == 200


def test_a_success_takes_back_only_that_accounts_failures(server):
    user(server, "bob@office.example")
    user(server, "mallory@office.example")
    assert spray(server, OFFICE, 6) == [401] * 6
    assert [login(server, "bob@office.example", OFFICE, "typo typo typo 1") for _ in range(3)] == [401] * 3
    assert login(server, "bob@office.example", OFFICE) == 200  # Bob's 3 typos stop counting against the office
    assert spray(server, OFFICE, 3, start=6) == [401] * 3  # 6 + 3 = 9 < 10: not locked
    assert spray(server, OFFICE, 1, start=9) == [401]  # the 10th failure locks
    # Mallory cannot clear her spray by logging into her own account: it takes back none of it.
    assert login(server, "mallory@office.example", OFFICE) == 429
    assert spray(server, OFFICE, 1, start=10) == [429]


def test_an_attacker_own_login_does_not_reset_the_address(server):
    user(server, "mallory@office.example")
    assert spray(server, OFFICE, 9) == [401] * 9
    assert login(server, "mallory@office.example", OFFICE) == 200
    assert spray(server, OFFICE, 1, start=9) == [401]
    assert spray(server, OFFICE, 1, start=10) == [429]


def test_the_address_count_is_forgotten_sooner_than_the_account_count(tmp_path):
    settings = load_settings(
        data_dir=tmp_path,
        engine="fake",
        network={"trusted_proxies": ["127.0.0.1"]},
        auth={"lockout_address_threshold": 3, "lockout_address_forget_seconds": 1.0, "lockout_address_max_seconds": 1},
    )
    app = build_app(settings)
    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        wait_ready(app)
        lockout = app.state.login.lockout
        assert lockout.address.forget_after_seconds < lockout.account.forget_after_seconds
        assert lockout.address.max_seconds <= lockout.account.max_seconds
        assert spray(client, OFFICE, 2) == [401, 401]
        time.sleep(1.2)
        assert spray(client, OFFICE, 2, start=2) == [401, 401]  # the first two were forgotten: 2 < 3
        assert spray(client, OFFICE, 1, start=4) == [401]  # the third in a row locks
        assert spray(client, OFFICE, 1, start=5) == [429]
