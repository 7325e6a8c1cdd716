"""Helpers for the tenancy tests: an app on a real database (SQLite file or the local PostgreSQL), users with
roles, real credentials for them (step-up tokens, API keys), and a snapshot of everything a grant could change."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from server.audit.models import AuditEvent
from server.audit.service import Actor
from server.identity import service
from server.identity.apikeys import create_key
from server.identity.models import ApiKey, Organization, RecoveryCode, Role, TotpEnrolment, User, UserRole
from server.settings import load_settings
from tests.storage_backends import fresh_postgres_database, postgres_available
from tests.unit.conftest import build_app, wait_ready


@contextmanager
def app_on(backend: str, data_dir: Any, **settings: Any) -> Iterator[TestClient]:
    """A started app (fake engine) on a SQLite file in `data_dir` or a fresh PostgreSQL database."""
    if backend == "postgresql":
        if not postgres_available():
            pytest.fail("PostgreSQL on 127.0.0.1:5432 is not reachable; .ci/run starts it")
        with fresh_postgres_database() as url, _client(data_dir, url, settings) as client:
            yield client
    else:
        with _client(data_dir, f"sqlite:///{data_dir / 'tenancy.db'}", settings) as client:
            yield client


@contextmanager
def _client(data_dir: Any, url: str, settings: dict[str, Any]) -> Iterator[TestClient]:
    app = build_app(load_settings(data_dir=data_dir, engine="fake", database_url=url, **settings))
    with TestClient(app) as client:
        wait_ready(app)
        yield client


def add_org(app: Any, name: str) -> str:
    with app.state.db.session() as s:
        return service.create_org(s, Actor.system(), name).id


def add_user(app: Any, org_id: str, email: str, roles: list[str], password_hash: str | None = None) -> str:
    with app.state.db.session() as s:
        return service.create_user(
            s, Actor.system(), org_id=org_id, email=email, roles=roles, password_hash=password_hash
        ).id


def add_role(app: Any, org_id: str, name: str, permissions: list[str]) -> None:
    with app.state.db.session() as s:
        service.create_role(s, Actor.system(), org_id, name, permissions)


def step_up(app: Any, user_id: str, org_id: str, scopes: list[str] | None = None) -> dict[str, str]:
    """Headers with a token as a password + TOTP login mints it (fresh second factor)."""
    token, _ = app.state.tokens.issue(
        sub=user_id, org=org_id, scopes=scopes or ["*"], amr=["pwd", "otp"], auth_time=int(time.time())
    )
    return {"Authorization": f"Bearer {token}"}


def api_key(app: Any, user_id: str, org_id: str, scopes: list[str]) -> dict[str, str]:
    with app.state.db.session() as s:
        _, plaintext = create_key(s, app.state.keyring.mac, org_id=org_id, user_id=user_id, name="t", scopes=scopes)
    return {"Authorization": f"Bearer {plaintext}"}


def snapshot(app: Any) -> dict[str, Any]:
    """Everything a grant or a factor change could alter."""
    with app.state.db.session() as s:
        return {
            "orgs": sorted(s.scalars(select(Organization.id))),
            "users": sorted(s.execute(select(User.id, User.email, User.password_hash, User.disabled)).tuples()),
            "roles": sorted((r.id, r.name, r.org_id, tuple(sorted(r.permissions))) for r in s.scalars(select(Role))),
            "user_roles": sorted(s.execute(select(UserRole.user_id, UserRole.role_id)).tuples()),
            "keys": sorted(
                (k.id, k.user_id, k.secret_hmac, tuple(k.scopes), k.revoked_at is None)
                for k in s.scalars(select(ApiKey))
            ),
            "totp": sorted(s.execute(select(TotpEnrolment.user_id, TotpEnrolment.secret_encrypted)).tuples()),
            "recovery": sorted(s.scalars(select(RecoveryCode.code_hmac))),
        }


def denied_events(app: Any) -> int:
    app.state.audit_sink.flush()
    with app.state.db.session() as s:
        return len(list(s.scalars(select(AuditEvent.id).where(AuditEvent.outcome == "denied"))))
