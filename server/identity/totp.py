"""TOTP second factor (RFC 6238: SHA-1, 6 digits, 30 s steps) and single-use recovery codes.

The TOTP secret is stored encrypted with the user id as associated data, so a ciphertext copied onto another
user's row does not decrypt. A code is accepted for the previous, current or next step (clock skew), and each
acceptance moves `last_used_step` forward in one conditional UPDATE: a code, or any older code, works once,
even when two requests present it at the same instant on different replicas. Recovery codes are stored only
as HMACs under the server pepper and are spent by a conditional UPDATE in the same way.

Exceptions (all ValueError, so a caller may treat them as bad input):

    TotpError
    ├── AlreadyEnrolled   enrolling over (or confirming) a confirmed enrolment; resetting is a separate flow
    ├── NotEnrolled       confirming without a pending enrolment, or new recovery codes without a confirmed one
    └── InvalidCode       confirming with a wrong, reused or malformed code
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pyotp
from sqlalchemy import Row, delete, insert, select, update
from sqlalchemy.orm import Session

from server.identity.models import RecoveryCode, TotpEnrolment
from server.identity.secrets import Keyring

STEP_SECONDS = 30
RECOVERY_CODE_COUNT = 10
# Crockford's base32 alphabet (no i, l, o, u): 5 bits a character, 12 characters = 60 bits a code.
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_RECOVERY_CHARS = 12
_LOOKALIKES = str.maketrans({"i": "1", "l": "1", "o": "0"})


class TotpError(ValueError):
    """Base of the TOTP errors."""


class AlreadyEnrolled(TotpError):
    """The user has a confirmed enrolment."""


class NotEnrolled(TotpError):
    """No enrolment in the state the operation needs."""


class InvalidCode(TotpError):
    """The code is wrong, spent or malformed."""


def normalize_recovery_code(code: str) -> str:
    """Lowercase, drop spaces and dashes, read the look-alikes i/l/o as 1/1/0 (what a person copying it types)."""
    return "".join(code.split()).replace("-", "").lower().translate(_LOOKALIKES)


class TotpService:
    """Enrol, confirm and verify TOTP, and issue and spend recovery codes. Methods work in the caller's session."""

    def __init__(self, keyring: Keyring, issuer: str = "secure-model-server", clock: Callable[[], float] = time.time):
        self._keyring = keyring
        self.issuer = issuer
        self._clock = clock

    def enroll(self, session: Session, user_id: str, account_name: str) -> str:
        """Start (or restart) an unconfirmed enrolment with a fresh secret; return its `otpauth://` URI."""
        row = session.execute(
            select(TotpEnrolment.confirmed_at).where(TotpEnrolment.user_id == user_id).with_for_update()
        ).one_or_none()
        if row is not None and row.confirmed_at is not None:
            raise AlreadyEnrolled("TOTP is already enabled for this user; reset it before enrolling again")
        secret = pyotp.random_base32()
        values = {
            "secret_encrypted": self._keyring.box.encrypt(secret.encode(), aad=_aad(user_id)),
            "last_used_step": 0,
            "created_at": self._now(),
        }
        if row is None:
            session.execute(insert(TotpEnrolment).values(user_id=user_id, confirmed_at=None, **values))
        else:
            replaced = session.execute(
                update(TotpEnrolment)
                .where(TotpEnrolment.user_id == user_id, TotpEnrolment.confirmed_at.is_(None))
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if replaced.rowcount != 1:  # confirmed meanwhile by a concurrent request
                raise AlreadyEnrolled("TOTP is already enabled for this user; reset it before enrolling again")
        return pyotp.TOTP(secret).provisioning_uri(name=account_name, issuer_name=self.issuer)

    def confirm(self, session: Session, user_id: str, code: str) -> list[str]:
        """Confirm the pending enrolment with a current code; return the new recovery codes (shown once)."""
        row = self._enrolment(session, user_id)
        if row is not None and row.confirmed_at is not None:
            raise AlreadyEnrolled("TOTP is already enabled for this user")
        if row is None:
            raise NotEnrolled("there is no pending TOTP enrolment to confirm")
        step = self._matching_step(user_id, row.secret_encrypted, code)
        if step is None or not self._advance(session, user_id, row.secret_encrypted, step, confirming=True):
            raise InvalidCode("the code is not valid; check the authenticator app's clock and try again")
        return self._replace_recovery_codes(session, user_id)

    def verify(self, session: Session, user_id: str, code: str) -> bool:
        """True once per time step for a valid code of a confirmed enrolment; False for anything else."""
        row = self._enrolment(session, user_id)
        if row is None or row.confirmed_at is None:
            return False
        step = self._matching_step(user_id, row.secret_encrypted, code)
        return step is not None and self._advance(session, user_id, row.secret_encrypted, step, confirming=False)

    def use_recovery_code(self, session: Session, user_id: str, code: str) -> bool:
        """Spend one recovery code: True the first time it is presented, False after (or for any other string)."""
        normalized = normalize_recovery_code(code)
        if len(normalized) != _RECOVERY_CHARS or not set(normalized) <= set(_ALPHABET):
            return False
        spent = session.execute(
            update(RecoveryCode)
            .where(
                RecoveryCode.user_id == user_id,
                RecoveryCode.code_hmac == self._keyring.mac(normalized),
                RecoveryCode.used_at.is_(None),
            )
            .values(used_at=self._now())
            .execution_options(synchronize_session=False)
        )
        return spent.rowcount == 1

    def regenerate_recovery_codes(self, session: Session, user_id: str) -> list[str]:
        """Replace every recovery code of a confirmed enrolment (old ones stop working); return the new ones."""
        if not self.is_enrolled(session, user_id):
            raise NotEnrolled("TOTP is not enabled for this user")
        return self._replace_recovery_codes(session, user_id)

    def is_enrolled(self, session: Session, user_id: str) -> bool:
        row = self._enrolment(session, user_id)
        return row is not None and row.confirmed_at is not None

    def _enrolment(self, session: Session, user_id: str) -> Row[tuple[str, datetime | None]] | None:
        # Columns, not the entity: an entity in the session's identity map could be stale after the
        # conditional UPDATEs below, which deliberately bypass it.
        return session.execute(
            select(TotpEnrolment.secret_encrypted, TotpEnrolment.confirmed_at).where(TotpEnrolment.user_id == user_id)
        ).one_or_none()

    def _matching_step(self, user_id: str, secret_encrypted: str, code: str) -> int | None:
        """The latest of steps t-1, t, t+1 whose code equals `code`; every candidate is compared in constant time."""
        code = "".join(code.split())
        if len(code) != 6 or not all(c in "0123456789" for c in code):
            return None
        # A secret that does not decrypt means the master secret changed or the row was tampered with: raise.
        totp = pyotp.TOTP(self._keyring.box.decrypt(secret_encrypted, aad=_aad(user_id)).decode())
        now_step = int(self._clock()) // STEP_SECONDS
        matched = None
        for step in (now_step - 1, now_step, now_step + 1):
            if hmac.compare_digest(totp.generate_otp(step), code):
                matched = step
        return matched

    def _advance(self, session: Session, user_id: str, secret_encrypted: str, step: int, *, confirming: bool) -> bool:
        """Record `step` as used, only if it is newer than the last used one: the replay guard, atomic in SQL."""
        state = TotpEnrolment.confirmed_at.is_(None) if confirming else TotpEnrolment.confirmed_at.is_not(None)
        values: dict[str, object] = {"last_used_step": step}
        if confirming:
            values["confirmed_at"] = self._now()
        accepted = session.execute(
            update(TotpEnrolment)
            .where(
                TotpEnrolment.user_id == user_id,
                TotpEnrolment.last_used_step < step,
                TotpEnrolment.secret_encrypted == secret_encrypted,  # not re-enrolled since we read it
                state,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        return accepted.rowcount == 1

    def _replace_recovery_codes(self, session: Session, user_id: str) -> list[str]:
        codes: dict[str, None] = {}  # ordered and distinct
        while len(codes) < RECOVERY_CODE_COUNT:
            raw = "".join(secrets.choice(_ALPHABET) for _ in range(_RECOVERY_CHARS))
            codes[f"{raw[:4]}-{raw[4:8]}-{raw[8:]}"] = None
        session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
        session.execute(
            insert(RecoveryCode),
            [{"user_id": user_id, "code_hmac": self._keyring.mac(normalize_recovery_code(c))} for c in codes],
        )
        return list(codes)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)


def _aad(user_id: str) -> str:
    return f"totp:{user_id}"
