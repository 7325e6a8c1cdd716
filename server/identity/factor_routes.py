"""The caller's own sign-in factors: TOTP enrolment, recovery codes, password.

Changing a factor needs an interactive session: a token from a password login (`grant_type=password`),
never an API key nor a token exchanged for one, whose holder proved the account's current factors
recently (`auth.step_up_max_age_seconds`): the password alone while no second factor is enrolled, the
password and the second factor once one is. Otherwise a stolen key could lock its owner out (enrol a TOTP
the owner does not have) or take the account over. Refusals are audited; nothing is changed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import Field
from sqlalchemy.orm import Session

from server.api.body import read_body
from server.api.protocol import StrictModel, parse_request
from server.audit.service import record
from server.errors import Conflict, InteractiveSessionRequired, InvalidRequest, PermissionDenied, StepUpRequired
from server.identity.authn import client_addr, principal_of
from server.identity.authz import requires
from server.identity.models import User
from server.identity.passwords import check_policy
from server.identity.principal import Principal
from server.identity.totp import TotpError

router = APIRouter(prefix="/v1/auth")
_BODY_LIMIT = 16 * 1024
T = TypeVar("T")


class CodeRequest(StrictModel):
    code: str = Field(min_length=6, max_length=16)


class PasswordChange(StrictModel):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Field(min_length=1, max_length=256)


def require_interactive(request: Request, p: Principal, *, enrolled: bool) -> None:
    """Refuse unless `p` is a recent password session (with its second factor when `enrolled`)."""
    if not p.interactive:
        raise InteractiveSessionRequired(
            "Sign-in factors can only be changed in a session from a password login (POST /v1/auth/token "
            "with grant_type=password), never with an API key."
        )
    max_age, now = request.app.state.settings.auth.step_up_max_age_seconds, time.time()
    if enrolled and not p.mfa_fresh(max_age, now):
        raise StepUpRequired("Log in again with your password and your current TOTP (or a recovery code), then retry.")
    if not 0 <= now - p.auth_time <= max_age:
        raise StepUpRequired("Log in again with your password, then retry.")


def _account(session: Session, p: Principal) -> User:
    user = session.get(User, p.user_id)
    if user is None or user.is_service_account:
        raise InvalidRequest("Service accounts have no sign-in factors.")
    return user


async def _change(request: Request, action: str, work: Callable[[Session, Principal], T]) -> T:
    """Run `work` in one transaction; a refusal is audited as `action` (denied) and changes nothing."""
    p, state = principal_of(request), request.app.state

    def run() -> T:
        with state.db.session() as session:
            return work(session, p)

    try:
        return await asyncio.to_thread(run)
    except (PermissionDenied, StepUpRequired) as exc:
        state.audit_sink.submit(p.actor(client_addr(request)), action, "denied", reason=exc.code, path=request.url.path)
        raise


@router.post("/mfa/enroll", dependencies=[requires("self")])
async def mfa_enroll(request: Request) -> dict[str, Any]:
    totp = request.app.state.totp

    def enroll(session: Session, p: Principal) -> str:
        user = _account(session, p)
        require_interactive(request, p, enrolled=totp.is_enrolled(session, user.id))
        try:
            uri = totp.enroll(session, user.id, user.email)
        except TotpError as exc:
            raise Conflict(str(exc)) from None
        record(session, p.actor(client_addr(request)), "mfa.enroll", "success", target_type="user", target_id=user.id)
        return str(uri)

    return {
        "provisioning_uri": await _change(request, "mfa.enroll", enroll),
        "next": "POST /v1/auth/mfa/confirm with a current code to activate MFA and receive recovery codes",
    }


@router.post("/mfa/confirm", dependencies=[requires("self")])
async def mfa_confirm(request: Request) -> dict[str, Any]:
    req = parse_request(CodeRequest, await read_body(request, _BODY_LIMIT))
    totp = request.app.state.totp

    def confirm(session: Session, p: Principal) -> list[str]:
        user = _account(session, p)
        require_interactive(request, p, enrolled=totp.is_enrolled(session, user.id))
        try:
            codes: list[str] = totp.confirm(session, user.id, req.code)
        except TotpError as exc:
            raise InvalidRequest(str(exc), param="code") from None
        record(session, p.actor(client_addr(request)), "mfa.confirm", "success", target_type="user", target_id=user.id)
        return codes

    return {
        "recovery_codes": await _change(request, "mfa.confirm", confirm),
        "note": "Store these recovery codes now; they are shown once and each works once.",
    }


@router.post("/mfa/recovery-codes", dependencies=[requires("self")])
async def new_recovery_codes(request: Request) -> dict[str, Any]:
    """Replace every recovery code (the old ones stop working)."""
    totp = request.app.state.totp

    def regenerate(session: Session, p: Principal) -> list[str]:
        user = _account(session, p)
        enrolled = totp.is_enrolled(session, user.id)
        require_interactive(request, p, enrolled=True)
        if not enrolled:
            raise InvalidRequest("TOTP is not enabled for this account: enrol it first.")
        codes: list[str] = totp.regenerate_recovery_codes(session, user.id)
        record(
            session,
            p.actor(client_addr(request)),
            "mfa.recovery_codes",
            "success",
            target_type="user",
            target_id=user.id,
        )
        return codes

    return {
        "recovery_codes": await _change(request, "mfa.recovery_codes", regenerate),
        "note": "Store these recovery codes now; they replace the old ones, are shown once and each works once.",
    }


@router.post("/password", dependencies=[requires("self")])
async def change_password(request: Request) -> dict[str, Any]:
    req = parse_request(PasswordChange, await read_body(request, _BODY_LIMIT))
    state = request.app.state

    def change(session: Session, p: Principal) -> str | None:
        """None once changed; the account's email if the current password was wrong (nothing changed)."""
        user = _account(session, p)
        require_interactive(request, p, enrolled=state.totp.is_enrolled(session, user.id))
        ok, _ = state.hasher.verify(req.current_password, user.password_hash)
        if not ok:
            return user.email
        try:
            check_policy(req.new_password, min_length=state.settings.auth.password_min_length, email=user.email)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="new_password") from None
        user.password_hash = state.hasher.hash(req.new_password)
        user.password_changed_at = datetime.now(UTC)
        record(
            session, p.actor(client_addr(request)), "auth.password", "success", target_type="user", target_id=user.id
        )
        return None

    wrong = await _change(request, "auth.password", change)
    if wrong is not None:  # counted like a failed login, in its own transaction
        actor = principal_of(request).actor(client_addr(request))
        await asyncio.to_thread(state.login.failed_password, actor, wrong)
        raise InvalidRequest(
            "The current password is not correct.", param="current_password", code="invalid_credentials"
        )
    return {"object": "password", "changed": True}
