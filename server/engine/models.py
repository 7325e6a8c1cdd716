"""Engine-domain tables: the operator-set state of each pool, shared by every replica."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from server.storage.base import Base, utcnow


class PoolState(Base):
    """`serving` (default when absent), `draining` (finish in-flight, admit nothing new) or `isolated`
    (refuse everything new, for incident response)."""

    __tablename__ = "pool_states"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="serving")
    reason: Mapped[str] = mapped_column(String(500), nullable=False, default="")
    changed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
