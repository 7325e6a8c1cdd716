"""Password hashing (dummy hash, rehash on login, malformed hashes) and the password policy."""

from __future__ import annotations

import statistics
import time
import unicodedata

import pytest

from server.identity.passwords import MAX_LENGTH, PasswordHasher, WeakPassword, check_policy

CHEAP = {"time_cost": 1, "memory_cost": 8192, "parallelism": 1}
STRONG = "violet kettle marches sideways"


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(**CHEAP)


def test_hash_is_argon2id_with_the_given_parameters_and_verifies(hasher):
    stored = hasher.hash(STRONG)
    assert stored.startswith("$argon2id$v=19$m=8192,t=1,p=1$")
    assert hasher.verify(STRONG, stored) == (True, None)
    assert hasher.verify(STRONG + "x", stored) == (False, None)
    assert hasher.hash(STRONG) != stored  # salted


def test_production_defaults_are_owasp_argon2id():
    assert PasswordHasher().hash(STRONG).startswith("$argon2id$v=19$m=19456,t=2,p=1$")


def test_unicode_forms_of_the_same_password_verify(hasher):
    composed = "caf\u00e9 kettle marches"
    stored = hasher.hash(composed)
    assert hasher.verify(unicodedata.normalize("NFD", composed), stored) == (True, None)


def test_missing_hash_verifies_against_the_dummy_and_fails(hasher):
    assert hasher.verify(STRONG, None) == (False, None)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "garbage",
        "$2b$12$abcdefghijklmnopqrstuv",
        "$argon2id$v=19$m=8192,t=1,p=1$zzz",
        "$argon2id$v=19$m=8192,t=1,p=1$c2FsdHNhbHQ$",
        "$argon2id$v=19$m=8192,t=1,p=1$c2FsdHNhbHRzYWx0$!!!",
    ],
)
def test_malformed_stored_hash_fails_without_raising(hasher, stored):
    assert hasher.verify(STRONG, stored) == (False, None)


def test_overlong_password_fails_without_raising_and_cannot_be_hashed(hasher):
    stored = hasher.hash(STRONG)
    assert hasher.verify("x" * 10_000, stored) == (False, None)
    assert hasher.verify("x" * 10_000, None) == (False, None)
    with pytest.raises(WeakPassword):
        hasher.hash("x" * (MAX_LENGTH + 1))


def test_hash_with_old_parameters_is_rehashed_on_successful_login(hasher):
    old = hasher.hash(STRONG)
    upgraded = PasswordHasher(time_cost=2, memory_cost=8192, parallelism=1)
    ok, new = upgraded.verify(STRONG, old)
    assert ok and new is not None and new.startswith("$argon2id$v=19$m=8192,t=2,p=1$")
    assert upgraded.verify(STRONG, new) == (True, None)
    assert upgraded.verify("wrong password", old) == (False, None)  # no rehash without a match


def test_dummy_verification_costs_the_same_as_a_real_failed_one():
    hasher = PasswordHasher(time_cost=1, memory_cost=16384, parallelism=1)
    stored = hasher.hash(STRONG)
    real, dummy, malformed = [], [], []
    for _ in range(20):  # interleaved, so that load changes on the box hit all three alike
        for samples, target in ((real, stored), (dummy, None), (malformed, "$argon2id$broken")):
            start = time.perf_counter()
            assert hasher.verify("wrong password", target) == (False, None)
            samples.append(time.perf_counter() - start)
    reference = statistics.median(real)
    for samples in (dummy, malformed):
        assert abs(statistics.median(samples) - reference) <= 0.25 * reference, (reference, samples)


@pytest.mark.parametrize(
    ("password", "email", "reason"),
    [
        ("short pw", None, "at least 12"),
        ("x" * (MAX_LENGTH + 1), None, "at most"),
        ("password1234", None, "most common"),
        ("PASSWORD1234", None, "most common"),
        ("qwerty123456", None, "most common"),
        ("alice.smith-wombat-harbor", "Alice.Smith@example.com", "email"),
        ("aaaaaaaaaaaaaaaa", None, "too easy to guess"),
        ("abcdefghijklmnop", None, "too easy to guess"),
        ("Password2024!", None, "too easy to guess"),
        ("monkeymonkey12", None, "too easy to guess"),
    ],
)
def test_policy_rejects(password, email, reason):
    with pytest.raises(WeakPassword, match=reason):
        check_policy(password, min_length=12, email=email)


@pytest.mark.parametrize(
    ("password", "email"),
    [
        (STRONG, None),
        (STRONG, "alice@example.com"),
        ("bo-violet-kettle-marches", "bo@example.com"),  # a local part under 4 characters is not checked
        ("Xq7#vLp2!mZr9&Tw", None),
        ("a" * 60 + " violet kettle marches sideways " * 6, None),  # long ones are scored on a prefix
    ],
)
def test_policy_accepts_strong_passwords(password, email):
    check_policy(password[:MAX_LENGTH], min_length=12, email=email)
