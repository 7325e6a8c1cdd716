"""Admin API for limits and pools.

- `GET /v1/admin/limits/{scope}`: the limits set on a scope (`key:<id>`, `user:<id>`, `org:<id>`) and its
  current usage; `PUT` sets them (policy change: step-up). Keys keep their limits on the key row; users
  and organizations in `limit_overrides`. Every replica picks changes up within a second.
- `GET /v1/admin/pools`: each pool's configuration, state, admission gate and device telemetry.
- `POST /v1/admin/pools/{name}/drain|isolate|resume` (step-up), audited, applied on every replica.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from server.api.body import read_body
from server.api.protocol import StrictModel, parse_request
from server.audit.service import record
from server.engine.telemetry import pool_devices
from server.errors import InvalidRequest, NotFound
from server.identity.apikeys import bump_credentials
from server.identity.authn import client_addr, principal_of
from server.identity.authz import requires
from server.identity.models import ApiKey, Organization, User
from server.identity.principal import Principal
from server.policy.limits import Limits
from server.policy.models import LimitOverride

router = APIRouter(prefix="/v1/admin")
_LIMIT = Field(default=None, ge=0)


class LimitsBody(StrictModel):
    rpm: int | None = _LIMIT
    tpm: int | None = _LIMIT
    tpd: int | None = _LIMIT
    concurrent: int | None = _LIMIT
    reason: str = Field(default="", max_length=500)


class PoolAction(StrictModel):
    reason: str = Field(default="", max_length=500)


def _scope_org(session: Any, principal: Principal, scope: str) -> tuple[str, str, Any]:
    """(kind, id, row) of a scope the caller may see; others' scopes are 404."""
    kind, _, ident = scope.partition(":")
    model = {"key": ApiKey, "user": User, "org": Organization}.get(kind)
    if model is None or not ident:
        raise InvalidRequest("A scope is key:<id>, user:<id> or org:<id>.", param="scope")
    row = session.get(model, ident)
    org_id = getattr(row, "org_id", None) if kind != "org" else getattr(row, "id", None)
    if row is None or not principal.may_access_org(org_id):
        raise NotFound(f"Scope {scope!r} not found.")
    return kind, ident, row


@router.get("/limits/{scope}", dependencies=[requires("usage:read")])
async def get_limits(scope: str, request: Request) -> dict[str, Any]:
    p, state = principal_of(request), request.app.state

    def read() -> dict[str, Any]:
        with state.db.session() as session:
            kind, _, row = _scope_org(session, p, scope)
            if kind == "key":
                return dict(row.limits or {})
            override = session.get(LimitOverride, scope)
            return dict(override.limits) if override else {}

    limits = await asyncio.to_thread(read)
    usage = await state.gatekeeper.admitter.store.usage(scope)
    return {"object": "limits", "scope": scope, "limits": limits, "usage": usage}


@router.put("/limits/{scope}", dependencies=[requires("policy:write")])
async def set_limits(scope: str, request: Request) -> dict[str, Any]:
    body = parse_request(LimitsBody, await read_body(request, 16 * 1024))
    limits = Limits.from_dict(body.model_dump(exclude={"reason"})).to_dict()
    p, state = principal_of(request), request.app.state
    compact = {
        k: v
        for k, v in {"rpm": body.rpm, "tpm": body.tpm, "tpd": body.tpd, "concurrent": body.concurrent}.items()
        if v is not None
    }

    def write() -> None:
        with state.db.session() as session:
            kind, _, row = _scope_org(session, p, scope)
            if kind == "key":
                before = dict(row.limits or {})
                row.limits = compact
                bump_credentials(session)  # cached key records carry their limits
            else:
                override = session.get(LimitOverride, scope)
                before = dict(override.limits) if override else {}
                if override is None:
                    override = LimitOverride(scope=scope, org_id=row.org_id if kind == "user" else row.id)
                    session.add(override)
                override.limits, override.changed_by = compact, p.user_id
            record(
                session,
                p.actor(client_addr(request)),
                "limits.set",
                "success",
                target_type="scope",
                target_id=scope,
                before=before,
                after=compact,
                reason=body.reason,
            )
        state.authenticator.invalidate()
        state.gatekeeper.refresh()

    await asyncio.to_thread(write)
    return {"object": "limits", "scope": scope, "limits": compact, "effective": limits}


@router.get("/pools", dependencies=[requires("pools:read")])
async def list_pools(request: Request) -> dict[str, Any]:
    state = request.app.state
    gates = state.gatekeeper.snapshot()
    data = []
    for pool in state.settings.pools:
        devices = await asyncio.to_thread(pool_devices, pool.device, pool.devices)
        data.append(
            {
                "name": pool.name,
                "object": "pool",
                "device": pool.device,
                "devices": pool.devices,
                "state": state.pool_control.states.get(pool.name, "serving"),
                "models": [m.name for m in state.settings.models if m.pool == pool.name],
                "max_concurrency": pool.max_concurrency,
                "per_key_concurrency": pool.per_key_concurrency,
                "queue_length": pool.queue_length,
                "queue_timeout_seconds": pool.queue_timeout_seconds,
                "admission": gates.get(pool.name, {}),
                "telemetry": [d.as_dict() for d in devices],
            }
        )
    return {"object": "list", "data": data}


async def _set_pool(request: Request, name: str, state: Literal["serving", "draining", "isolated"]) -> dict[str, Any]:
    body = parse_request(PoolAction, await read_body(request, 16 * 1024, allow_empty=True))
    p = principal_of(request)
    control = request.app.state.pool_control
    await asyncio.to_thread(control.set_state, name, state, p.actor(client_addr(request)), body.reason)
    return {"object": "pool", "name": name, "state": control.states[name]}


@router.post("/pools/{name}/drain", dependencies=[requires("pools:write")])
async def drain_pool(name: str, request: Request) -> dict[str, Any]:
    return await _set_pool(request, name, "draining")


@router.post("/pools/{name}/isolate", dependencies=[requires("pools:write")])
async def isolate_pool(name: str, request: Request) -> dict[str, Any]:
    return await _set_pool(request, name, "isolated")


@router.post("/pools/{name}/resume", dependencies=[requires("pools:write")])
async def resume_pool(name: str, request: Request) -> dict[str, Any]:
    return await _set_pool(request, name, "serving")
