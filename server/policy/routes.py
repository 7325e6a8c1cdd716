"""Admin API for limits and pools.

- `GET /v1/admin/limits/{scope}`: the limits set on a scope (`key:<id>`, `user:<id>`, `org:<id>`) and its
  current usage (an organization's admin reads its own organization's figures here); `PUT` sets them
  (policy change: step-up). An organization's own limits are its quota, an installation resource
  (`quotas:write`); a key's or user's only by a caller who holds every permission that key or user has.
  Keys keep their limits on the key row; users and organizations in `limit_overrides`. Every replica
  picks changes up within a second.
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
from server.errors import PermissionDenied, StepUpRequired
from server.identity.apikeys import key_permissions, user_roles
from server.identity.authn import client_addr, principal_of
from server.identity.authz import requires
from server.identity.grants import check_may_manage
from server.identity.principal import Principal
from server.observability.pools import read_app_pools
from server.policy.limits import Limits
from server.policy.overrides import compact_limits, read_limits, write_limits

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


@router.get("/limits/{scope}", dependencies=[requires("usage:read")])
async def get_limits(scope: str, request: Request) -> dict[str, Any]:
    p, state = principal_of(request), request.app.state
    limits = await asyncio.to_thread(read_limits, state.db, scope, p.may_access_org)
    usage = await state.gatekeeper.admitter.store.usage(scope)
    return {"object": "limits", "scope": scope, "limits": limits, "usage": usage}


@router.put("/limits/{scope}", dependencies=[requires("policy:write")])
async def set_limits(scope: str, request: Request) -> dict[str, Any]:
    body = parse_request(LimitsBody, await read_body(request, 16 * 1024))
    limits = compact_limits(body.model_dump(exclude={"reason"}))
    p, state = principal_of(request), request.app.state
    actor = p.actor(client_addr(request))

    def write() -> None:
        write_limits(
            state.db,
            scope,
            limits,
            actor,
            changed_by=p.user_id,
            reason=body.reason,
            may_access_org=p.may_access_org,
            guard=_limits_guard(p),
        )
        state.authenticator.invalidate()
        state.gatekeeper.refresh()

    try:
        await asyncio.to_thread(write)
    except (PermissionDenied, StepUpRequired) as exc:
        state.audit_sink.submit(actor, "limits.set", "denied", reason=exc.code, scope=scope[:80], path=request.url.path)
        raise
    return {"object": "limits", "scope": scope, "limits": limits, "effective": Limits.from_dict(limits).to_dict()}


def _limits_guard(p: Principal) -> Any:
    def guard(session: Any, kind: str, row: Any) -> None:
        if kind == "org":
            if not (p.can("quotas:write") and p.holds_installation_role):
                raise PermissionDenied(
                    "An organization's own limits are its quota, set by the installation ('quotas:write')."
                )
        elif kind == "user":
            check_may_manage(p, user_roles(session, row.id)[1], "Changing this user's limits")
        else:
            check_may_manage(p, key_permissions(session, row), "Changing this key's limits")

    return guard


@router.get("/pools", dependencies=[requires("pools:read")])
async def list_pools(request: Request) -> dict[str, Any]:
    state = request.app.state
    # The same per-scrape reading as /metrics: a hung device driver delays this by its timeout, no more.
    readings = await read_app_pools(state)
    data = []
    for pool, reading in zip(state.settings.pools, readings, strict=True):
        data.append(
            {
                "name": pool.name,
                "object": "pool",
                "device": pool.device,
                "devices": pool.devices,
                "state": reading.state,
                "models": [m.name for m in state.settings.models if m.pool == pool.name],
                "max_concurrency": pool.max_concurrency,
                "per_key_concurrency": pool.per_key_concurrency,
                "queue_length": pool.queue_length,
                "queue_timeout_seconds": pool.queue_timeout_seconds,
                "admission": dict(reading.admission),
                "telemetry": [d.as_dict() for d in reading.devices],
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
