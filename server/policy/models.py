"""Limit overrides per user and per organization (a key's own limits live on the key row)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from server.storage.base import Base, utcnow


class LimitOverride(Base):
    """`scope` is `user:<id>` or `org:<id>`; `limits` is {"rpm", "tpm", "tpd", "concurrent"} (null = unlimited)."""

    __tablename__ = "limit_overrides"

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(40), nullable=False, index=True)
    limits: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    changed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
