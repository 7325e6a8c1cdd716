"""Token exchange, JWKS, and the caller's own identity and MFA."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from server.api.body import read_body
from server.api.protocol import StrictModel, parse_request
from server.audit.service import Actor, record
from server.errors import Conflict, InvalidRequest
from server.identity.authn import client_addr, principal_of
from server.identity.authz import requires
from server.identity.login import TokenRequest
from server.identity.models import User
from server.identity.rbac import PUBLIC

router = APIRouter()
_BODY_LIMIT = 16 * 1024


class CodeRequest(StrictModel):
    code: str = Field(min_length=6, max_length=16)


def _actor(request: Request) -> Actor:
    return Actor(type="anonymous", client_addr=client_addr(request))


@router.post("/v1/auth/token", dependencies=[requires(PUBLIC)])
async def issue_token(request: Request) -> dict[str, Any]:
    req = parse_request(TokenRequest, await read_body(request, _BODY_LIMIT))
    state = request.app.state
    if req.grant_type == "api_key":
        if not req.api_key:
            raise InvalidRequest("The api_key grant needs `api_key`.", param="api_key")
        # Authenticate exactly as a request bearing the key would be.
        scope = dict(request.scope)
        scope["headers"] = [(b"authorization", f"Bearer {req.api_key}".encode())]
        principal = await state.authenticator.authenticate(Request(scope))
        if principal.via != "api_key":
            raise InvalidRequest("`api_key` must be an API key (sk-…).", param="api_key")
        return await asyncio.to_thread(
            state.login.for_api_key, principal, req.scopes, principal.actor(client_addr(request))
        )
    return await asyncio.to_thread(state.login.for_password, req, _actor(request))


@router.get("/.well-known/jwks.json", dependencies=[requires(PUBLIC)])
async def jwks(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(request.app.state.tokens.jwks)


@router.get("/v1/auth/me", dependencies=[requires("self")])
async def me(request: Request) -> dict[str, Any]:
    p = principal_of(request)
    return {
        "user_id": p.user_id,
        "org_id": p.org_id,
        "roles": list(p.roles),
        "permissions": sorted(p.permissions),
        "via": p.via,
        "scopes": list(p.scopes),
        "amr": list(p.amr),
        "auth_time": p.auth_time,
        "api_key_id": p.api_key_id,
        "models": list(p.models) if p.models is not None else None,
    }


@router.post("/v1/auth/mfa/enroll", dependencies=[requires("self")])
async def mfa_enroll(request: Request) -> dict[str, Any]:
    p = principal_of(request)
    state = request.app.state

    def enroll() -> str:
        with state.db.session() as session:
            user = session.get(User, p.user_id)
            if user is None or user.is_service_account:
                raise InvalidRequest("Service accounts cannot enrol MFA.")
            try:
                uri = state.totp.enroll(session, user.id, user.email)
            except ValueError as exc:
                raise Conflict(str(exc)) from None
            record(
                session, p.actor(client_addr(request)), "mfa.enroll", "success", target_type="user", target_id=user.id
            )
            return uri

    return {
        "provisioning_uri": await asyncio.to_thread(enroll),
        "next": "POST /v1/auth/mfa/confirm with a current code to activate MFA and receive recovery codes",
    }


@router.post("/v1/auth/mfa/confirm", dependencies=[requires("self")])
async def mfa_confirm(request: Request) -> dict[str, Any]:
    p = principal_of(request)
    req = parse_request(CodeRequest, await read_body(request, _BODY_LIMIT))
    state = request.app.state

    def confirm() -> list[str]:
        with state.db.session() as session:
            try:
                codes = state.totp.confirm(session, p.user_id, req.code)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="code") from None
            record(
                session,
                p.actor(client_addr(request)),
                "mfa.confirm",
                "success",
                target_type="user",
                target_id=p.user_id,
            )
            return codes

    return {
        "recovery_codes": await asyncio.to_thread(confirm),
        "note": "Store these recovery codes now; they are shown once and each works once.",
    }
