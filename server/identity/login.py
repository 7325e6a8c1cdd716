"""`POST /v1/auth/token`: exchange an API key, or a password plus a second factor, for a short-lived JWT.

Password logins cost the same whether or not the account exists (a dummy hash is verified for unknown
emails), answer identically for an unknown email and a wrong password, and are throttled per email and per
client address with exponential backoff. A successful login clears the email's counter only, so an
address that sprays many accounts stays throttled.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import select

from server.api.protocol import StrictModel
from server.audit.service import Actor, record
from server.errors import InvalidRequest, TooManyAttempts, Unauthenticated
from server.identity.lockout import LoginThrottle
from server.identity.models import User
from server.identity.passwords import PasswordHasher
from server.identity.principal import Principal
from server.identity.rbac import UnknownScope, expand_scopes
from server.identity.tokens import TokenService
from server.identity.totp import TotpService
from server.settings import AuthSettings
from server.storage.db import Database


class TokenRequest(StrictModel):
    grant_type: Literal["api_key", "password"]
    api_key: str | None = Field(default=None, max_length=200)
    email: str | None = Field(default=None, max_length=320)
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


class LoginService:
    def __init__(
        self,
        db: Database,
        hasher: PasswordHasher,
        throttle: LoginThrottle,
        totp: TotpService,
        tokens: TokenService,
        settings: AuthSettings,
    ) -> None:
        self.db = db
        self.hasher = hasher
        self.throttle = throttle
        self.totp = totp
        self.tokens = tokens
        self.settings = settings

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
        subjects = [f"email:{email}"] + ([f"addr:{actor.client_addr}"] if actor.client_addr else [])
        with self.db.session() as session:
            wait = self.throttle.retry_after(session, subjects)
        if wait > 0:
            self._fail(actor, subjects, email, "locked", count=False)
            raise TooManyAttempts(
                f"Too many failed logins; retry in {int(wait) + 1} s.", headers={"Retry-After": str(int(wait) + 1)}
            )
        with self.db.session() as session:
            user = session.scalar(select(User).where(User.email == email))
            usable = user is not None and not user.disabled and not user.is_service_account
            ok, new_hash = self.hasher.verify(req.password, user.password_hash if usable and user else None)
            if ok and user is not None and new_hash:
                user.password_hash = new_hash
            user_id, org_id = (user.id, user.org_id) if ok and user is not None else (None, None)
            mfa = ok and user_id is not None and self.totp.is_enrolled(session, user_id)
        if not ok or user_id is None or org_id is None:
            self._fail(actor, subjects, email, "bad_credentials")
            raise Unauthenticated("Invalid email or password.", code="invalid_credentials")
        amr = ["pwd"]
        if mfa:
            amr.append(self._second_factor(req, actor, subjects, email, user_id))
        scopes = narrowed(["*"], req.scopes)
        token, exp = self.tokens.issue(sub=user_id, org=org_id, scopes=scopes, amr=amr, auth_time=int(time.time()))
        with self.db.session() as session:
            self.throttle.record_success(session, [f"email:{email}"])
            record(
                session, actor, "auth.login", "success", target_type="user", target_id=user_id, org_id=org_id, amr=amr
            )
        return token_response(token, exp, scopes)

    def _second_factor(self, req: TokenRequest, actor: Actor, subjects: list[str], email: str, user_id: str) -> str:
        if not req.totp_code and not req.recovery_code:
            raise Unauthenticated("This account has MFA: send `totp_code` (or a `recovery_code`).", code="mfa_required")
        with self.db.session() as session:
            if req.totp_code and self.totp.verify(session, user_id, req.totp_code):
                return "otp"
            if req.recovery_code and self.totp.use_recovery_code(session, user_id, req.recovery_code):
                return "mfa"
        self._fail(actor, subjects, email, "bad_second_factor")
        raise Unauthenticated("Invalid or already used MFA code.", code="invalid_mfa_code")

    def _fail(self, actor: Actor, subjects: list[str], email: str, reason: str, count: bool = True) -> None:
        with self.db.session() as session:
            if count:
                self.throttle.record_failure(session, subjects)
            record(session, actor, "auth.login", "failure", target_type="email", target_id=email[:128], reason=reason)
