"""The audit event table. `prev_hash`/`hash` are left for the audit work to chain and sign."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from server.storage.base import Base, utcnow


class AuditEvent(Base):
    __tablename__ = "audit_events"

    # BIGINT on PostgreSQL; SQLite only auto-increments an INTEGER primary key.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow, index=True)
    org_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    actor_type: Mapped[str] = mapped_column(String(16), nullable=False)  # user | key | system | anonymous
    actor_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    target_type: Mapped[str | None] = mapped_column(String(32), nullable=True)
    target_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)  # success | failure | denied
    client_addr: Mapped[str | None] = mapped_column(String(64), nullable=True)
    peer_addr: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    prev_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
