"""`POST /v1/auth/token`: exchange an API key, or a password plus a second factor, for a short-lived JWT.

Password logins cost the same whether or not the account exists (a dummy hash is verified for unknown
emails), answer identically for an unknown email and a wrong password, and are throttled per account and
per client address (`server.identity.lockout.LoginLockout`). An email may exist in several organizations:
the request then names one (`organization`, its id or name); without it such an address logs in as no one,
exactly like an unknown one. Failures are audited in aggregate (`AuditSink.failure`), never one row each.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from server.api.protocol import StrictModel
from server.audit.service import Actor, record
from server.audit.sink import AuditSink
from server.errors import InvalidRequest, TooManyAttempts, Unauthenticated
from server.identity.lockout import LockState, LoginLockout
from server.identity.models import Organization, User
from server.identity.passwords import PasswordHasher
from server.identity.principal import Principal
from server.identity.rbac import UnknownScope, expand_scopes
from server.identity.tokens import TokenService
from server.identity.totp import TotpService
from server.settings import AuthSettings
from server.storage.db import Database

log = logging.getLogger(__name__)

BAD_CREDENTIALS = (
    "Invalid email or password. If this address is registered in more than one organization, "
    "send `organization` (its id or name) too."
)


class TokenRequest(StrictModel):
    grant_type: Literal["api_key", "password"]
    api_key: str | None = Field(default=None, max_length=200)
    email: str | None = Field(default=None, max_length=320)
    organization: str | None = Field(default=None, max_length=200)
    password: str | None = Field(default=None, max_length=1024)
    totp_code: str | None = Field(default=None, max_length=16)
    recovery_code: str | None = Field(default=None, max_length=32)
    scopes: list[str] | None = Field(default=None, max_length=32)


def token_response(token: str, expires_at: int, scopes: list[str]) -> dict[str, Any]:
    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": max(0, expires_at - int(time.time())),
        "expires_at": expires_at,
        "scope": " ".join(scopes),
    }


def narrowed(granted: list[str], requested: list[str] | None) -> list[str]:
    """Requested scopes, which must lie within the granted ones; the granted ones if none were requested."""
    if requested is None:
        return list(granted)
    try:
        if not expand_scopes(requested) <= expand_scopes(granted):
            raise InvalidRequest("The requested scopes exceed what this credential grants.", param="scopes")
    except UnknownScope as exc:
        raise InvalidRequest(str(exc), param="scopes") from None
    return list(requested)


def find_login_user(session: Session, email: str, organization: str | None) -> User | None:
    """The one user an email (within `organization`, if given) names; None if none or several."""
    query = select(User).where(User.email == email)
    if organization:
        query = query.join(Organization, Organization.id == User.org_id).where(
            or_(Organization.id == organization, Organization.name == organization)
        )
    rows = session.scalars(query.limit(2)).all()
    return rows[0] if len(rows) == 1 else None


def _locked(wait: float, *, address: bool) -> TooManyAttempts:
    retry = int(wait) + 1
    hint = " Accounts with a second factor can still log in from this address with their code." if address else ""
    return TooManyAttempts(f"Too many failed logins; retry in {retry} s.{hint}", headers={"Retry-After": str(retry)})


class LoginService:
    def __init__(
        self,
        db: Database,
        hasher: PasswordHasher,
        lockout: LoginLockout,
        totp: TotpService,
        tokens: TokenService,
        settings: AuthSettings,
        audit: AuditSink,
    ) -> None:
        self.db = db
        self.hasher = hasher
        self.lockout = lockout
        self.totp = totp
        self.tokens = tokens
        self.settings = settings
        self.audit = audit

    def for_api_key(self, principal: Principal, requested: list[str] | None, actor: Actor) -> dict[str, Any]:
        scopes = narrowed(list(principal.scopes), requested)
        token, exp = self.tokens.issue(
            sub=principal.user_id,
            org=principal.org_id,
            scopes=scopes,
            amr=["key"],
            auth_time=int(time.time()),
            api_key=principal.api_key_id,
        )
        with self.db.session() as session:
            record(
                session,
                actor,
                "auth.token",
                "success",
                target_type="user",
                target_id=principal.user_id,
                grant="api_key",
                api_key=principal.api_key_id,
                scopes=scopes,
            )
        return token_response(token, exp, scopes)

    def for_password(self, req: TokenRequest, actor: Actor) -> dict[str, Any]:
        """Blocking (argon2): call from a worker thread."""
        if not req.email or req.password is None:
            raise InvalidRequest("The password grant needs `email` and `password`.", param="email")
        email = req.email.strip().lower()
        address = actor.client_addr
        with self.db.session() as session:
            lock = self.lockout.state(session, email, address)
        if lock.account_wait > 0:
            self._refused(actor, email, "locked")
            raise _locked(lock.account_wait, address=False)
        address_locked = lock.address_wait > 0
        if address_locked and not (req.totp_code or req.recovery_code):
            self._refused(actor, email, "address_locked")
            raise _locked(lock.address_wait, address=True)
        with self.db.session() as session:
            user = find_login_user(session, email, req.organization)
            usable = user is not None and not user.disabled and not user.is_service_account
            ok, new_hash = self.hasher.verify(req.password, user.password_hash if usable and user else None)
            if ok and user is not None and new_hash:
                user.password_hash = new_hash
            user_id, org_id = (user.id, user.org_id) if ok and user is not None else (None, None)
            mfa = ok and user_id is not None and self.totp.is_enrolled(session, user_id)
        if not ok or user_id is None or org_id is None:
            after = self._fail(actor, email, "bad_credentials")
            if address_locked:
                raise _locked(max(after.address_wait, lock.address_wait), address=True)
            raise Unauthenticated(BAD_CREDENTIALS, code="invalid_credentials")
        amr = ["pwd"]
        if mfa:
            amr.append(self._second_factor(req, actor, email, user_id, lock))
        elif address_locked:  # right password, but nothing else proves it is the owner trying
            self._refused(actor, email, "address_locked")
            raise _locked(lock.address_wait, address=True)
        scopes = narrowed(["*"], req.scopes)
        token, exp = self.tokens.issue(sub=user_id, org=org_id, scopes=scopes, amr=amr, auth_time=int(time.time()))
        with self.db.session() as session:
            self.lockout.success(session, email, address)
            record(
                session, actor, "auth.login", "success", target_type="user", target_id=user_id, org_id=org_id, amr=amr
            )
        return token_response(token, exp, scopes)

    def _second_factor(self, req: TokenRequest, actor: Actor, email: str, user_id: str, lock: LockState) -> str:
        if not req.totp_code and not req.recovery_code:
            raise Unauthenticated("This account has MFA: send `totp_code` (or a `recovery_code`).", code="mfa_required")
        with self.db.session() as session:
            if req.totp_code and self.totp.verify(session, user_id, req.totp_code):
                return "otp"
            if req.recovery_code and self.totp.use_recovery_code(session, user_id, req.recovery_code):
                return "mfa"
        after = self._fail(actor, email, "bad_second_factor")
        if lock.address_wait > 0:
            raise _locked(max(after.address_wait, lock.address_wait), address=True)
        raise Unauthenticated("Invalid or already used MFA code.", code="invalid_mfa_code")

    def failed_password(self, actor: Actor, email: str) -> None:
        """A wrong current password elsewhere (a password change): counted and audited like a failed login."""
        self._fail(actor, email, "bad_credentials")

    def _fail(self, actor: Actor, email: str, reason: str) -> LockState:
        """A failed attempt: counted against the account and the address, audited in aggregate."""
        with self.db.session() as session:
            state = self.lockout.failure(session, email, actor.client_addr)
        self._refused(actor, email, reason)
        if self.lockout.prune_due():
            try:
                with self.db.session() as session:
                    self.lockout.prune(session)
            except Exception as exc:  # pruning is housekeeping; the next one retries
                log.warning("pruning login failure counters failed: %s", exc)
        return state

    def _refused(self, actor: Actor, email: str, reason: str) -> None:
        self.audit.failure(actor, "auth.login", reason, email=email)
