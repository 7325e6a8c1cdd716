"""`GET /v1/admin/audit`: audit events of the caller's organization (all of them for the owner), newest first."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select

from server.audit.models import AuditEvent
from server.errors import InvalidRequest, PermissionDenied
from server.identity.authn import principal_of
from server.identity.authz import requires

router = APIRouter()


def event_view(e: AuditEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "object": "audit_event",
        "ts": e.ts.isoformat(),
        "org_id": e.org_id,
        "actor_type": e.actor_type,
        "actor_id": e.actor_id,
        "action": e.action,
        "outcome": e.outcome,
        "target_type": e.target_type,
        "target_id": e.target_id,
        "client_addr": e.client_addr,
        "peer_addr": e.peer_addr,
        "request_id": e.request_id,
        "details": e.details,
    }


@router.get("/v1/admin/audit", dependencies=[requires("audit:read")])
async def list_audit(request: Request) -> dict[str, Any]:
    p = principal_of(request)
    params = request.query_params
    try:
        limit = int(params.get("limit", "100"))
        before = int(params["before"]) if "before" in params else None
    except ValueError:
        raise InvalidRequest("limit and before must be integers", param="limit") from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit must be between 1 and 1000", param="limit")
    org_id = params.get("org_id")
    if org_id is not None and org_id != p.org_id and not p.is_owner:
        raise PermissionDenied("You can only read your own organization's audit events.")
    action = params.get("action")

    def load() -> dict[str, Any]:
        request.app.state.audit_sink.flush()
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit + 1)
        scope = org_id if p.is_owner else p.org_id
        if scope is not None:
            query = query.where(AuditEvent.org_id == scope)
        if before is not None:
            query = query.where(AuditEvent.id < before)
        if action:
            query = query.where(AuditEvent.action == action)
        with request.app.state.db.session() as session:
            rows = list(session.scalars(query))
            data = [event_view(e) for e in rows[:limit]]
        more = len(rows) > limit
        return {"object": "list", "data": data, "has_more": more, "next_before": data[-1]["id"] if more else None}

    return await asyncio.to_thread(load)
