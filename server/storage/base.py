"""The declarative base shared by every domain's tables. Each table change comes with an Alembic revision."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

# Deterministic constraint names so migrations are identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def all_tables() -> MetaData:
    """The metadata with every domain's tables registered (what Alembic compares against)."""
    import server.audit.models  # noqa: F401
    import server.engine.models  # noqa: F401
    import server.identity.models  # noqa: F401
    import server.policy.models  # noqa: F401
    import server.registry.models  # noqa: F401
    import server.watermark.models  # noqa: F401

    return Base.metadata
