"""Login lockout with exponential backoff, per subject, shared by every replica through the database.

`LoginThrottle` counts consecutive failures of one kind of subject; once a subject has `threshold` of them it
is locked for `base * 2**(failures - threshold)` seconds, capped at `max_seconds`: 1 s, 2 s, 4 s, ... with the
defaults, which costs a user who mistypes nothing and an online guesser almost everything. A subject's count
starts again after `forget_after_seconds` without failures.

`LoginLockout` is what the password grant uses: two throttles that cannot be turned against other people.

- **Per account** (`email:<lowercased email>`, whether or not an account has it, so being locked out never
  reveals that an account exists): locks after 5 failures, cleared by that account's successful login,
  counts forgotten after a day.
- **Per client address** (`addr:<address>`, the address from `server.identity.clients`, so a forged
  X-Forwarded-For changes nothing): counts only failures (a higher threshold, shorter locks, forgotten
  after 15 minutes by default). A successful login takes back the failures *that account* had from the
  address (kept in `pair:<address>|<email>` rows), so an attacker cannot clear the count of a password
  spray by logging into an account of their own, while a user's own typos stop counting against their
  neighbours once they get in. While an address is locked, a login that carries a second factor is still
  tried: an account that proves its password *and* its TOTP or recovery code gets in; every failure from a
  locked address answers 429, whatever failed, so the lock stays an oracle-free wall for guessers.

Rows older than their subject's forget window are pruned as failures come in, so the table holds at most
what the window admits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.identity.models import AuthFailure
from server.settings import AuthSettings

_MAX_EXPONENT = 32  # 2**32 s is already past any sane cap; bounds the float arithmetic


def email_subject(email: str) -> str:
    return f"email:{email.strip().lower()}"


def address_subject(address: str) -> str:
    return f"addr:{address}"


def pair_subject(address: str, email: str) -> str:
    return f"pair:{address}|{email.strip().lower()}"


class LoginThrottle:
    """Consecutive-failure counters with exponential lockout, race-safe across processes (an upsert per subject)."""

    def __init__(
        self,
        threshold: int,
        base_seconds: float,
        max_seconds: float,
        clock: Callable[[], float] = time.time,
        *,
        forget_after_seconds: float = 86400.0,
    ) -> None:
        if threshold < 1 or base_seconds <= 0 or max_seconds < base_seconds:
            raise ValueError("need threshold >= 1 and 0 < base_seconds <= max_seconds")
        self.threshold = threshold
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self.forget_after_seconds = max(forget_after_seconds, max_seconds)
        self._clock = clock

    def lock_seconds(self, failures: int) -> float:
        """How long a subject with this many consecutive failures stays locked (0 below the threshold)."""
        if failures < self.threshold:
            return 0.0
        exponent = min(failures - self.threshold, _MAX_EXPONENT)
        return min(self.max_seconds, self.base_seconds * 2**exponent)

    def retry_after(self, session: Session, subjects: Iterable[str]) -> float:
        """Seconds until every one of `subjects` is unlocked; 0.0 when none is locked."""
        wanted = sorted(set(subjects))
        if not wanted:
            return 0.0
        rows = session.execute(select(AuthFailure.locked_until).where(AuthFailure.subject.in_(wanted)))
        now = self._now()
        waits = [(_as_utc(until) - now).total_seconds() for (until,) in rows if until is not None]
        return max([0.0, *waits])

    def record_failure(self, session: Session, subjects: Iterable[str], *, locking: bool = True) -> float:
        """Count one more failure for each subject, lock those at or past the threshold; return `retry_after`.

        `locking=False` only counts (the `pair:` rows)."""
        ordered = sorted(set(subjects))  # one lock order for every caller, so concurrent callers cannot deadlock
        now = self._now()
        stale_before = now - timedelta(seconds=self.forget_after_seconds)
        insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        for subject in ordered:
            stmt: Any = insert(AuthFailure).values(subject=subject, failures=1, last_failure_at=now, locked_until=None)
            # The increment happens in the database under the row lock, so concurrent failures all count.
            stmt = stmt.on_conflict_do_update(
                index_elements=[AuthFailure.subject],
                set_={
                    "failures": case(
                        (AuthFailure.last_failure_at < stale_before, 1),
                        else_=AuthFailure.failures + 1,
                    ),
                    "last_failure_at": now,
                },
            ).returning(AuthFailure.failures)
            failures = session.execute(stmt).scalar_one()
            # Same transaction, row still locked by the upsert: nobody can interleave between the two.
            lock = self.lock_seconds(failures) if locking else 0.0
            session.execute(
                update(AuthFailure)
                .where(AuthFailure.subject == subject)
                .values(locked_until=now + timedelta(seconds=lock) if lock else None)
                .execution_options(synchronize_session=False)
            )
        return self.retry_after(session, ordered)

    def record_success(self, session: Session, subjects: Iterable[str]) -> None:
        """Forget the failures of `subjects` (callers pass the account subject only; see the module docstring)."""
        wanted = sorted(set(subjects))
        if wanted:
            session.execute(
                delete(AuthFailure).where(AuthFailure.subject.in_(wanted)).execution_options(synchronize_session=False)
            )

    def forgive(self, session: Session, subject: str, failures: int) -> None:
        """Take `failures` back from a subject's count (not below 0), unlocking it if it falls below the threshold."""
        if failures <= 0:
            return
        session.execute(
            update(AuthFailure)
            .where(AuthFailure.subject == subject)
            .values(
                failures=case((AuthFailure.failures > failures, AuthFailure.failures - failures), else_=0),
                locked_until=case(
                    (AuthFailure.failures - failures < self.threshold, None), else_=AuthFailure.locked_until
                ),
            )
            .execution_options(synchronize_session=False)
        )

    def recent_failures(self, session: Session, subject: str) -> int:
        """A subject's count, 0 if it has been quiet for longer than the forget window."""
        stale_before = self._now() - timedelta(seconds=self.forget_after_seconds)
        count = session.scalar(
            select(AuthFailure.failures).where(
                AuthFailure.subject == subject, AuthFailure.last_failure_at >= stale_before
            )
        )
        return int(count or 0)

    def prune(self, session: Session, prefixes: Iterable[str]) -> int:
        """Delete the rows of subjects starting with `prefixes` that have been quiet past the forget window."""
        stale_before = self._now() - timedelta(seconds=self.forget_after_seconds)
        deleted = 0
        for prefix in prefixes:
            result = session.execute(
                delete(AuthFailure)
                .where(AuthFailure.subject.startswith(prefix, autoescape=True))
                .where(AuthFailure.last_failure_at < stale_before)
                .execution_options(synchronize_session=False)
            )
            deleted += int(getattr(result, "rowcount", 0) or 0)
        return deleted

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)


@dataclass(frozen=True)
class LockState:
    account_wait: float  # seconds until the account may try again (0: not locked)
    address_wait: float  # seconds until the address may try without a second factor (0: not locked)


class LoginLockout:
    """The per-account and per-address throttles of the password grant (see the module docstring)."""

    PRUNE_EVERY_SECONDS = 60.0

    def __init__(self, account: LoginThrottle, address: LoginThrottle, clock: Callable[[], float] = time.time):
        self.account = account
        self.address = address
        self._clock = clock
        self._pruned_at = float("-inf")

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> LoginLockout:
        account = LoginThrottle(auth.lockout_threshold, auth.lockout_base_seconds, auth.lockout_max_seconds)
        address_max = max(auth.lockout_base_seconds, auth.lockout_address_max_seconds)
        address = LoginThrottle(
            auth.lockout_address_threshold,
            auth.lockout_base_seconds,
            address_max,
            forget_after_seconds=auth.lockout_address_forget_seconds,
        )
        return cls(account, address)

    def state(self, session: Session, email: str, address: str | None) -> LockState:
        account_wait = self.account.retry_after(session, [email_subject(email)])
        address_wait = self.address.retry_after(session, [address_subject(address)]) if address else 0.0
        return LockState(account_wait, address_wait)

    def failure(self, session: Session, email: str, address: str | None) -> LockState:
        """Count a failed login of `email` from `address`; return the resulting lock state."""
        account_wait = self.account.record_failure(session, [email_subject(email)])
        address_wait = 0.0
        if address:  # lock order: email:, addr:, pair: (as in `success`), so concurrent logins cannot deadlock
            address_wait = self.address.record_failure(session, [address_subject(address)])
            self.address.record_failure(session, [pair_subject(address, email)], locking=False)
        return LockState(account_wait, address_wait)

    def success(self, session: Session, email: str, address: str | None) -> None:
        """The account logged in: clear its count, and take its failures from this address back."""
        self.account.record_success(session, [email_subject(email)])
        if address:
            pair = pair_subject(address, email)
            self.address.forgive(session, address_subject(address), self.address.recent_failures(session, pair))
            self.address.record_success(session, [pair])

    def prune_due(self) -> bool:
        """True at most once per PRUNE_EVERY_SECONDS: then the caller runs `prune` in a transaction of its own."""
        now = self._clock()
        if now - self._pruned_at < self.PRUNE_EVERY_SECONDS:
            return False
        self._pruned_at = now
        return True

    def prune(self, session: Session) -> int:
        """Forget quiet subjects, so the table holds no more than the forget windows admit."""
        return self.account.prune(session, ["email:"]) + self.address.prune(session, ["addr:", "pair:"])


def _as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored here is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
