"""Relational storage: SQLAlchemy 2 models, engine construction by URL, Alembic migrations."""
