"""Registry tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from server.storage.base import Base, utcnow


class ModelVersion(Base):
    """An immutable served model version: a name, a version label and the content digest of its folder.

    A new digest for the same name becomes the next version ("v1", "v2", ...); the same digest is always
    the same version, so responses name a version a reviewer can look up.
    """

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
        UniqueConstraint("name", "digest", name="uq_model_versions_name_digest"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    version: Mapped[str] = mapped_column(String(64), nullable=False)
    digest: Mapped[str] = mapped_column(String(64), nullable=False)
    path: Mapped[str] = mapped_column(String(1024), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class RegistryModel(Base):
    """A model name in the registry and its alias: the active version, and where a rollback goes next.

    Promotion and rollback move only these pointers; the versions they point at are never modified.
    """

    __tablename__ = "registry_models"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    active_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    previous_active_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class ModelVersionMeta(Base):
    """Registry facts about one ``ModelVersion``: its lifecycle state, signer, provenance, evaluation and BOM.

    Kept beside ``model_versions`` rather than in it so the version record itself (name, label, digest) stays
    exactly as first written. ``replaced_version_id`` is the version that was active when this one was
    promoted: rollback follows these links back, one promotion at a time.
    """

    __tablename__ = "model_version_meta"

    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="imported", index=True)
    signer_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    eval_results: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    eval_passed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    bom_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    replaced_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    evaluated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
