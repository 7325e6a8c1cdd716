"""Login lockout with exponential backoff, against SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from server.identity.lockout import LoginLockout, LoginThrottle, address_subject, email_subject, pair_subject
from server.identity.models import AuthFailure, Organization, User
from server.storage.db import Database
from server.storage.migrate import upgrade
from tests.storage_backends import database_url  # noqa: F401 - fixture


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(database_url):  # noqa: F811
    upgrade(database_url)
    database = Database(database_url)
    yield database
    database.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def throttle(clock) -> LoginThrottle:
    return LoginThrottle(threshold=3, base_seconds=1.0, max_seconds=8.0, clock=clock)


def fail(db, throttle, subjects) -> float:
    with db.session() as s:
        return throttle.record_failure(s, subjects)


def retry_after(db, throttle, subjects) -> float:
    with db.session() as s:
        return throttle.retry_after(s, subjects)


def test_lock_grows_exponentially_from_the_threshold_and_is_capped(db, throttle, clock):
    subject = [email_subject("Alice@Example.com")]
    assert subject == ["email:alice@example.com"]
    assert retry_after(db, throttle, subject) == 0.0
    assert [fail(db, throttle, subject) for _ in range(2)] == [0.0, 0.0]  # below the threshold
    assert retry_after(db, throttle, subject) == 0.0
    waits = [fail(db, throttle, subject) for _ in range(6)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    clock.now += 5.0
    assert retry_after(db, throttle, subject) == pytest.approx(3.0)
    clock.now += 3.0
    assert retry_after(db, throttle, subject) == 0.0


def test_success_resets_only_the_given_subjects(db, throttle):
    account, address = email_subject("bob@example.com"), address_subject("203.0.113.9")
    for _ in range(3):
        fail(db, throttle, [account, address])
    assert retry_after(db, throttle, [account]) == retry_after(db, throttle, [address]) == 1.0
    with db.session() as s:
        throttle.record_success(s, [account])
    assert retry_after(db, throttle, [account]) == 0.0
    assert retry_after(db, throttle, [account, address]) == 1.0  # the address stays locked
    assert fail(db, throttle, [account]) == 0.0  # the account counts from zero again


def test_retry_after_is_the_longest_wait_among_subjects(db, throttle):
    a, b = address_subject("198.51.100.1"), email_subject("carol@example.com")
    for _ in range(5):
        fail(db, throttle, [a])
    for _ in range(3):
        fail(db, throttle, [b])
    assert retry_after(db, throttle, [a, b]) == 4.0
    assert retry_after(db, throttle, []) == 0.0


def test_unknown_email_behaves_exactly_like_a_known_one(db, throttle):
    with db.session() as s:
        s.add(Organization(id="org1", name="Org"))
        s.flush()
        s.add(User(id="u1", org_id="org1", email="known@example.com"))
    known, unknown = email_subject("known@example.com"), email_subject("nobody@example.com")
    assert [fail(db, throttle, [known]) for _ in range(5)] == [fail(db, throttle, [unknown]) for _ in range(5)]


def test_counts_start_again_after_a_long_quiet_period(db, clock):
    throttle = LoginThrottle(threshold=3, base_seconds=1.0, max_seconds=8.0, clock=clock, forget_after_seconds=60)
    subject = [address_subject("192.0.2.7")]
    fail(db, throttle, subject)
    fail(db, throttle, subject)
    clock.now += 61
    assert fail(db, throttle, subject) == 0.0  # a third failure, but the first two were forgotten
    assert [fail(db, throttle, subject) for _ in range(2)] == [0.0, 1.0]


def test_stored_times_are_utc_and_huge_failure_counts_do_not_overflow(db, throttle, clock):
    subject = [email_subject("mallory@example.com")]
    fail(db, throttle, subject)
    with db.session() as s:
        s.execute(AuthFailure.__table__.update().values(failures=10_000))
    assert fail(db, throttle, subject) == 8.0
    with db.session() as s:
        row = s.execute(select(AuthFailure.locked_until, AuthFailure.failures)).one()
    assert row.failures == 10_001
    locked_until = row.locked_until if row.locked_until.tzinfo else row.locked_until.replace(tzinfo=UTC)
    assert locked_until == datetime.fromtimestamp(clock.now + 8.0, UTC)


def test_concurrent_failures_lose_no_increments(database_url):  # noqa: F811
    upgrade(database_url)
    db = Database(database_url)
    throttle = LoginThrottle(threshold=1000, base_seconds=1.0, max_seconds=8.0)
    threads, per_thread = 8, 25
    barrier = threading.Barrier(threads)
    subjects = [email_subject("dave@example.com"), address_subject("203.0.113.50")]
    errors: list[BaseException] = []

    def worker(reverse: bool) -> None:
        try:
            barrier.wait()
            for _ in range(per_thread):
                fail(db, throttle, list(reversed(subjects)) if reverse else subjects)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i % 2 == 1,)) for i in range(threads)]
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert not errors, errors
        with db.session() as s:
            counts = dict(s.execute(select(AuthFailure.subject, AuthFailure.failures)).tuples().all())
        assert counts == {subject: threads * per_thread for subject in subjects}
    finally:
        db.dispose()


def lockout(clock) -> LoginLockout:
    account = LoginThrottle(threshold=3, base_seconds=1.0, max_seconds=8.0, clock=clock)
    address = LoginThrottle(threshold=4, base_seconds=1.0, max_seconds=2.0, clock=clock, forget_after_seconds=60)
    return LoginLockout(account, address, clock=clock)


def test_a_login_takes_back_its_own_failures_from_the_address(db, clock):
    both = lockout(clock)
    office = "198.51.100.40"
    with db.session() as s:
        for _ in range(2):
            both.failure(s, "bob@example.com", office)
        both.failure(s, "target@example.com", office)
        assert both.failure(s, "other@example.com", office).address_wait == 1.0  # 4 failures: locked
    with db.session() as s:
        both.success(s, "bob@example.com", office)
    with db.session() as s:
        state = both.state(s, "bob@example.com", office)
        rows = dict(s.execute(select(AuthFailure.subject, AuthFailure.failures)).tuples().all())
    assert state.address_wait == 0.0 and state.account_wait == 0.0  # 4 - 2 = 2 < 4: unlocked
    assert rows[address_subject(office)] == 2
    assert pair_subject(office, "bob@example.com") not in rows and email_subject("bob@example.com") not in rows
    assert rows[pair_subject(office, "target@example.com")] == 1


def test_quiet_subjects_are_pruned_by_their_own_window(db, clock):
    both = lockout(clock)
    with db.session() as s:
        both.failure(s, "carol@example.com", "203.0.113.77")
    clock.now += 61  # past the address window (60 s), within the account's (a day)
    with db.session() as s:
        assert both.prune(s) == 2  # the addr: and pair: rows
        left = set(s.scalars(select(AuthFailure.subject)))
    assert left == {email_subject("carol@example.com")}
    clock.now += 86_400
    with db.session() as s:
        assert both.prune(s) == 1
