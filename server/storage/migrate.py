"""Run Alembic migrations programmatically (on start and by `python -m server db upgrade`)."""

from __future__ import annotations

import fcntl

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from server.settings import REPO_ROOT
from server.storage.db import Database, normalize_url

MIGRATIONS_DIR = REPO_ROOT / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


# Any constant: serializes migrations of replicas starting at once against one PostgreSQL.
_PG_MIGRATION_LOCK = 0x5E_C0_DE_01


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate to `revision`; safe when several processes start at once (they take turns)."""
    db = Database(url)  # creates the SQLite folder if needed
    try:
        if db.engine.dialect.name == "postgresql":
            with db.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
                try:
                    command.upgrade(alembic_config(url), revision)
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_MIGRATION_LOCK})
        elif db.engine.dialect.name == "sqlite" and db.engine.url.database:
            with open(f"{db.engine.url.database}.migrate.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                command.upgrade(alembic_config(url), revision)
        else:
            command.upgrade(alembic_config(url), revision)
    finally:
        db.dispose()


def current_revision(db: Database) -> str | None:
    with db.engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()
