"""Watermark tables: keys (encrypted at rest) and API keys exempted from watermarking.

A key row never holds key material in the clear: `key_encrypted` is AES-256-GCM under the server's
key-encryption key (`Keyring.box`, derived from the configured master secret) with associated data
`watermark:<key_id>`, so a ciphertext copied onto another row does not decrypt. Rows are never deleted:
a retired key stays for detection of the texts generated while it was active.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from server.storage.base import Base, utcnow

ACTIVE = "active"
RETIRED = "retired"


class WatermarkKey(Base):
    """A 128-bit watermark key. `org_id` None is the deployment's default key."""

    __tablename__ = "watermark_keys"

    key_id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "wk_" + 12 hex
    org_id: Mapped[str | None] = mapped_column(ForeignKey("organizations.id"), nullable=True, index=True)
    scheme: Mapped[str] = mapped_column(String(16), nullable=False)  # kgw-selfhash | kgw-lefthash | gumbel | auto
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)  # gamma, delta, width
    key_encrypted: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=ACTIVE)  # active | retired
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WatermarkExemption(Base):
    """An API key whose responses are not watermarked (granted by an admin, audited)."""

    __tablename__ = "watermark_exemptions"

    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    created_by: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    reason: Mapped[str] = mapped_column(String(500), nullable=False)
