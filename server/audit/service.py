"""Writing audit events. Callers pass the session of the change they record, so the event commits (or rolls
back) with it: there is never a change without its event, nor an event for a change that did not happen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from server.audit.models import AuditEvent


@dataclass(frozen=True)
class Actor:
    """Who acted: a user (with or without the API key used), the system, or an anonymous caller."""

    type: str  # user | key | system | anonymous
    id: str | None = None
    org_id: str | None = None
    client_addr: str | None = None  # the effective client (from a trusted proxy's header, else the TCP peer)
    request_id: str | None = None
    peer_addr: str | None = None  # the TCP peer the request arrived from

    @classmethod
    def system(cls) -> Actor:
        return cls(type="system", id="cli")


def record(
    session: Session,
    actor: Actor,
    action: str,
    outcome: str,
    *,
    target_type: str | None = None,
    target_id: str | None = None,
    org_id: str | None = None,
    **details: Any,
) -> None:
    session.add(
        AuditEvent(
            org_id=org_id if org_id is not None else actor.org_id,
            actor_type=actor.type,
            actor_id=actor.id,
            action=action,
            outcome=outcome,
            target_type=target_type,
            target_id=target_id,
            client_addr=actor.client_addr,
            peer_addr=actor.peer_addr,
            request_id=actor.request_id,
            details=details,
        )
    )
