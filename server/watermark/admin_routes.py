"""Admin API for watermark keys and exemptions (never key material).

- `GET /v1/admin/watermark`: the deployment's scheme and parameters, the keys the caller's organization
  generates or detects under (its own and the default's; the owner sees every organization's), and the
  exempt API keys of the organization (`watermark:read`).
- `POST /v1/admin/watermark/keys/rotate` `{"org_id"?, "reason"?}`: retire the active key and create a new
  one (an organization's first rotation gives it a key of its own); `"org_id": null` with the owner role
  rotates the deployment default. Retired keys stay for detection. (`watermark:admin`, step-up.)
- `PUT /v1/admin/watermark/exemptions/{key_id}` `{"reason"}` / `DELETE …`: stop or resume
  watermarking one API key's responses (`watermark:admin`, step-up). All audited; every replica applies
  changes within `watermark.cache_seconds`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from server.api.body import read_body
from server.api.protocol import StrictModel, parse_request
from server.errors import NotFound, PermissionDenied
from server.identity.authn import client_addr, principal_of
from server.identity.authz import requires

router = APIRouter(prefix="/v1/admin/watermark")
_BODY_BYTES = 16 * 1024
_UNSET: Any = object()


class RotateBody(StrictModel):
    org_id: str | None = Field(default=_UNSET, max_length=64)
    reason: str = Field(default="", max_length=500)


class ExemptBody(StrictModel):
    reason: str = Field(min_length=1, max_length=500)


class UnexemptBody(StrictModel):
    reason: str = Field(default="", max_length=500)


async def _body(request: Request, model: type[StrictModel]) -> Any:
    return parse_request(model, await read_body(request, _BODY_BYTES, allow_empty=True))


@router.get("", dependencies=[requires("watermark:read")])
async def watermark_state(request: Request) -> dict[str, Any]:
    p, keys = principal_of(request), request.app.state.watermark_keys
    described = await asyncio.to_thread(keys.describe, p.org_id, everything=p.is_owner)
    s = keys.settings
    config = {
        "enabled": s.enabled,
        "scheme": s.scheme,
        "gamma": s.gamma,
        "delta": s.delta,
        "gate": s.gate,
        "warmup": s.warmup,
        "width": s.width,
    }
    return {"object": "watermark", "config": config, **described}


@router.post("/keys/rotate", dependencies=[requires("watermark:admin")])
async def rotate_key(request: Request) -> dict[str, Any]:
    body = await _body(request, RotateBody)
    p, keys = principal_of(request), request.app.state.watermark_keys
    org_id = p.org_id if body.org_id is _UNSET else body.org_id
    if org_id is None and not p.can("watermark:default"):
        raise PermissionDenied(
            "Rotating the deployment's default watermark key needs the installation permission 'watermark:default'."
        )
    if org_id is not None and not p.may_access_org(org_id):
        raise NotFound(f"Organization {org_id!r} not found.", param="org_id")
    actor = p.actor(client_addr(request))
    material = await asyncio.to_thread(keys.rotate, org_id, actor, body.reason or "rotation")
    return {"object": "watermark.key", "key_id": material.key_id, "org_id": org_id, "scheme": material.scheme}


@router.put("/exemptions/{key_id}", dependencies=[requires("watermark:admin")])
async def exempt_key(key_id: str, request: Request) -> dict[str, Any]:
    return await _set_exemption(request, key_id, exempt=True)


@router.delete("/exemptions/{key_id}", dependencies=[requires("watermark:admin")])
async def unexempt_key(key_id: str, request: Request) -> dict[str, Any]:
    return await _set_exemption(request, key_id, exempt=False)


async def _set_exemption(request: Request, key_id: str, *, exempt: bool) -> dict[str, Any]:
    body = await _body(request, ExemptBody if exempt else UnexemptBody)
    p, keys = principal_of(request), request.app.state.watermark_keys
    change = keys.exempt if exempt else keys.unexempt
    within = None if p.is_owner else p.org_id  # an organization's admin: its own API keys only
    await asyncio.to_thread(change, key_id, p.actor(client_addr(request)), body.reason, within_org=within)
    return {"object": "watermark.exemption", "api_key_id": key_id, "exempt": exempt}
