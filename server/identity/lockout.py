"""Login lockout with exponential backoff, per subject, shared by every replica through the database.

A subject is `email:<lowercased email>` or `addr:<client address>`. The email subject is used whether or not
an account has that email, so being locked out (or not) never reveals that an account exists. Once a subject
has `threshold` consecutive failures it is locked for `base * 2**(failures - threshold)` seconds, capped at
`max_seconds`: 1 s, 2 s, 4 s, ... with the defaults, which costs a user who mistypes nothing and an online
guesser almost everything.

How callers use it: check `retry_after` for the email and address subjects before verifying a password (and
refuse without verifying while it is positive); on a wrong password `record_failure` for both; on success
`record_success` for the email subject only. The address subject is not reset on success, so an attacker
cannot clear their address's count by logging into an account of their own between guesses. Instead, a
subject's count starts again after `forget_after_seconds` without failures, so an office behind one NAT
address does not stay one typo away from a lockout forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from sqlalchemy import case, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from server.identity.models import AuthFailure

_MAX_EXPONENT = 32  # 2**32 s is already past any sane cap; bounds the float arithmetic


def email_subject(email: str) -> str:
    return f"email:{email.strip().lower()}"


def address_subject(address: str) -> str:
    return f"addr:{address}"


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

    def record_failure(self, session: Session, subjects: Iterable[str]) -> float:
        """Count one more failure for each subject, lock those at or past the threshold; return `retry_after`."""
        ordered = sorted(set(subjects))  # one lock order for every caller, so concurrent callers cannot deadlock
        now = self._now()
        stale_before = now - timedelta(seconds=self.forget_after_seconds)
        insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        for subject in ordered:
            stmt = insert(AuthFailure).values(subject=subject, failures=1, last_failure_at=now, locked_until=None)
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
            lock = self.lock_seconds(failures)
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

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)


def _as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored here is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
