"""Token exchange, JWKS, and the caller's own identity; its sign-in factors are in `factor_routes`."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from server.api.body import read_body
from server.api.protocol import parse_request
from server.errors import InvalidRequest
from server.identity.authn import client_addr, principal_of
from server.identity.authz import requires
from server.identity.clients import anonymous_actor
from server.identity.factor_routes import router as factor_router
from server.identity.login import TokenRequest
from server.identity.rbac import PUBLIC

router = APIRouter()
router.include_router(factor_router)
_BODY_LIMIT = 16 * 1024


@router.post("/v1/auth/token", dependencies=[requires(PUBLIC)])
async def issue_token(request: Request) -> dict[str, Any]:
    req = parse_request(TokenRequest, await read_body(request, _BODY_LIMIT))
    state = request.app.state
    address = client_addr(request)  # resolved from this request's headers, before they are replaced below
    if req.grant_type == "api_key":
        if not req.api_key:
            raise InvalidRequest("The api_key grant needs `api_key`.", param="api_key")
        # Authenticate exactly as a request bearing the key would be.
        scope = dict(request.scope)
        scope["headers"] = [(b"authorization", f"Bearer {req.api_key}".encode())]
        principal = await state.authenticator.authenticate(Request(scope))
        if principal.via != "api_key":
            raise InvalidRequest("`api_key` must be an API key (sk-…).", param="api_key")
        return await asyncio.to_thread(state.login.for_api_key, principal, req.scopes, principal.actor(address))
    return await asyncio.to_thread(state.login.for_password, req, anonymous_actor(address))


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
