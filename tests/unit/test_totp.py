"""TOTP enrolment, verification with replay protection, and recovery codes, against SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest
from cryptography.exceptions import InvalidTag
from sqlalchemy import select

from server.identity.models import Organization, RecoveryCode, TotpEnrolment, User
from server.identity.secrets import Keyring
from server.identity.totp import AlreadyEnrolled, InvalidCode, NotEnrolled, TotpService, normalize_recovery_code
from server.storage.db import Database
from server.storage.migrate import upgrade
from tests.storage_backends import database_url  # noqa: F401 - fixture

T0 = 1_700_000_010.0  # 10 s into a 30 s step


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(database_url):  # noqa: F811
    upgrade(database_url)
    database = Database(database_url)
    with database.session() as s:
        s.add(Organization(id="org1", name="Org"))
        s.flush()
        s.add_all([User(id=uid, org_id="org1", email=f"{uid}@example.com") for uid in ("alice", "bob")])
    yield database
    database.dispose()


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(b"k" * 48)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def totp(keyring, clock) -> TotpService:
    return TotpService(keyring, clock=clock)


def enroll(db, totp, user_id="alice") -> str:
    with db.session() as s:
        uri = totp.enroll(s, user_id, f"{user_id}@example.com")
    return pyotp.parse_uri(uri).secret


def enrolled(db, totp, clock, user_id="alice") -> tuple[str, list[str]]:
    secret = enroll(db, totp, user_id)
    with db.session() as s:
        codes = totp.confirm(s, user_id, pyotp.TOTP(secret).at(clock.now))
    clock.now += 30  # the confirming step is spent
    return secret, codes


def verify(db, totp, code, user_id="alice") -> bool:
    with db.session() as s:
        return totp.verify(s, user_id, code)


def stored_secret(db, user_id="alice") -> str:
    with db.session() as s:
        return s.execute(select(TotpEnrolment.secret_encrypted).where(TotpEnrolment.user_id == user_id)).scalar_one()


def test_enroll_returns_a_provisioning_uri_for_an_encrypted_secret(db, totp, keyring):
    with db.session() as s:
        uri = totp.enroll(s, "alice", "alice@example.com")
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert parsed.issuer == "secure-model-server" and parsed.name == "alice@example.com"
    assert urlparse(uri).scheme == "otpauth" and parse_qs(urlparse(uri).query)["secret"] == [parsed.secret]
    ciphertext = stored_secret(db)
    assert parsed.secret not in ciphertext
    assert keyring.box.decrypt(ciphertext, aad="totp:alice").decode() == parsed.secret
    with pytest.raises(InvalidTag):
        keyring.box.decrypt(ciphertext, aad="totp:bob")
    with db.session() as s:
        assert not totp.is_enrolled(s, "alice")
        assert not totp.verify(s, "alice", parsed.now())  # unconfirmed enrolments do not verify


def test_reenrolling_before_confirmation_replaces_the_secret(db, totp, clock):
    first = enroll(db, totp)
    second = enroll(db, totp)
    assert first != second
    with db.session() as s, pytest.raises(InvalidCode):
        totp.confirm(s, "alice", pyotp.TOTP(first).at(clock.now))
    with db.session() as s:
        assert len(totp.confirm(s, "alice", pyotp.TOTP(second).at(clock.now))) == 10
        assert totp.is_enrolled(s, "alice")


def test_confirmed_enrolment_cannot_be_replaced_or_confirmed_again(db, totp, clock):
    secret, _ = enrolled(db, totp, clock)
    with db.session() as s, pytest.raises(AlreadyEnrolled):
        totp.enroll(s, "alice", "alice@example.com")
    with db.session() as s, pytest.raises(AlreadyEnrolled):
        totp.confirm(s, "alice", pyotp.TOTP(secret).at(clock.now))
    with db.session() as s, pytest.raises(NotEnrolled):
        totp.confirm(s, "bob", "123456")


def test_verify_accepts_one_step_of_skew_and_refuses_two(db, totp, clock):
    secret, _ = enrolled(db, totp, clock)
    gen = pyotp.TOTP(secret)
    assert not verify(db, totp, gen.at(clock.now - 60))
    assert not verify(db, totp, gen.at(clock.now + 60))
    clock.now += 30  # so that the previous step is not the one spent by confirming
    assert verify(db, totp, gen.at(clock.now - 30))
    clock.now += 30
    assert verify(db, totp, gen.at(clock.now))
    clock.now += 30
    assert verify(db, totp, gen.at(clock.now + 30))  # the next step, and now every older one is spent
    assert not verify(db, totp, gen.at(clock.now))


def test_a_code_works_once(db, totp, clock):
    secret, _ = enrolled(db, totp, clock)
    code = pyotp.TOTP(secret).at(clock.now)
    assert verify(db, totp, code)
    assert not verify(db, totp, code)
    clock.now += 20  # still inside the window
    assert not verify(db, totp, code)


@pytest.mark.parametrize("shape", ["", "12345", "1234567", "12a456", "１２３４５６", "-12345"])
def test_codes_must_be_six_ascii_digits(db, totp, clock, shape):
    enrolled(db, totp, clock)
    assert not verify(db, totp, shape)


def test_spaces_in_a_code_are_ignored(db, totp, clock):
    secret, _ = enrolled(db, totp, clock)
    code = pyotp.TOTP(secret).at(clock.now)
    assert verify(db, totp, f" {code[:3]} {code[3:]} ")


def test_concurrent_use_of_one_code_passes_once(db, totp, clock):
    secret, _ = enrolled(db, totp, clock)
    code = pyotp.TOTP(secret).at(clock.now)
    threads = 6
    barrier = threading.Barrier(threads)
    results: list[bool] = []

    def worker() -> None:
        barrier.wait()
        results.append(verify(db, totp, code))

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert sorted(results) == [False] * (threads - 1) + [True]


def test_recovery_codes_are_distinct_strong_and_stored_only_as_hmacs(db, totp, clock, keyring):
    _, codes = enrolled(db, totp, clock)
    assert len(set(codes)) == 10
    alphabet = set("0123456789abcdefghjkmnpqrstvwxyz")
    for code in codes:
        groups = code.split("-")
        assert [len(g) for g in groups] == [4, 4, 4] and set("".join(groups)) <= alphabet  # 12 x 5 = 60 bits
    with db.session() as s:
        stored = set(s.execute(select(RecoveryCode.code_hmac).where(RecoveryCode.user_id == "alice")).scalars())
    assert stored == {keyring.mac(normalize_recovery_code(c)) for c in codes}


def test_each_recovery_code_works_once_and_only_for_its_user(db, totp, clock):
    _, codes = enrolled(db, totp, clock)
    enrolled(db, totp, clock, "bob")
    with db.session() as s:
        assert not totp.use_recovery_code(s, "bob", codes[0])
        assert totp.use_recovery_code(s, "alice", codes[0].upper().replace("-", " "))
        assert not totp.use_recovery_code(s, "alice", codes[0])
        assert totp.use_recovery_code(s, "alice", codes[1])
        assert not totp.use_recovery_code(s, "alice", "not-a-code")
        assert not totp.use_recovery_code(s, "alice", "")


def test_lookalike_characters_in_a_recovery_code_are_forgiven():
    assert normalize_recovery_code(" AbI0-oL1z-1234 ") == normalize_recovery_code("ab10-011z-1234") == "ab10011z1234"


def test_regenerating_recovery_codes_invalidates_the_old_ones(db, totp, clock):
    _, old = enrolled(db, totp, clock)
    with db.session() as s:
        new = totp.regenerate_recovery_codes(s, "alice")
    assert not set(new) & set(old)
    with db.session() as s:
        assert not any(totp.use_recovery_code(s, "alice", c) for c in old)
        assert all(totp.use_recovery_code(s, "alice", c) for c in new)
    with db.session() as s, pytest.raises(NotEnrolled):
        totp.regenerate_recovery_codes(s, "bob")


def test_an_enrolment_secret_moved_to_another_user_does_not_verify(db, totp, clock):
    secret, _ = enrolled(db, totp, clock)
    enrolled(db, totp, clock, "bob")
    with db.session() as s:
        s.execute(
            TotpEnrolment.__table__.update()
            .where(TotpEnrolment.user_id == "bob")
            .values(secret_encrypted=stored_secret(db))
        )
    with db.session() as s, pytest.raises(InvalidTag):
        totp.verify(s, "bob", pyotp.TOTP(secret).at(clock.now))
