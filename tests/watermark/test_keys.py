"""Key storage, rotation, per-organization keys and audited exemptions, on a migrated SQLite database."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from server.audit.models import AuditEvent
from server.audit.service import Actor
from server.errors import InvalidRequest, NotFound
from server.identity import service
from server.identity.apikeys import create_key
from server.identity.secrets import Keyring
from server.storage.db import Database
from server.storage.migrate import upgrade
from server.watermark.detector import detect
from server.watermark.keys import WatermarkKeyring
from server.watermark.models import WatermarkKey
from server.watermark.settings import WatermarkSettings
from tests.storage_backends import database_url  # noqa: F401
from tests.watermark.conftest import generate

ADMIN = Actor(type="user", id="usr_admin", org_id=None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(database_url):  # noqa: F811 - SQLite and PostgreSQL (tests.storage_backends)
    upgrade(database_url)
    database = Database(database_url)
    yield database
    database.dispose()


@pytest.fixture
def keyring():
    return Keyring(b"m" * 48)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def keys(db, keyring, clock):
    return WatermarkKeyring(db, keyring, WatermarkSettings(), clock=clock)


@pytest.fixture
def orgs(db, keyring):
    """Two organizations, each with a user and an API key: {name: (org_id, api_key_id)}."""
    out = {}
    with db.session() as session:
        service.ensure_builtin_roles(session)
        for name in ("alpha", "beta"):
            org = service.create_org(session, Actor.system(), name)
            user = service.create_user(session, Actor.system(), org_id=org.id, email=f"u@{name}.test", roles=["client"])
            row, _ = create_key(session, keyring.mac, org_id=org.id, user_id=user.id, name="k", scopes=["inference"])
            out[name] = (org.id, row.id)
    return out


def test_default_key_is_created_once_with_the_configured_parameters(keys):
    first = keys.ensure_default_key()
    assert re.fullmatch(r"wk_[0-9a-f]{12}", first.key_id) and len(first.key) == 16
    defaults = WatermarkSettings()
    assert (first.scheme, first.gamma, first.delta, first.width, first.org_id) == (
        "auto",
        0.25,
        defaults.delta,
        0,
        None,
    )
    assert (first.gate, first.warmup) == (defaults.gate, defaults.warmup) and first.gate > 0
    assert keys.ensure_default_key() == first and keys.active_key_for(None).key == first.key
    assert first.key.hex() not in repr(first)


def test_keys_are_encrypted_at_rest_and_bound_to_their_row(db, keys, tmp_path):
    a = keys.ensure_default_key()
    b = keys.rotate(None)
    with db.session() as session:
        rows = {r.key_id: r for r in session.scalars(select(WatermarkKey))}
        stored = repr([(r.key_encrypted, r.params, r.scheme) for r in rows.values()])
        assert all(r.key_encrypted.startswith("v1.") for r in rows.values())
    raw = stored.encode()
    if db.engine.dialect.name == "sqlite":  # and nowhere in the database file or its WAL
        files = list(tmp_path.glob("test.db*"))
        assert files
        raw += b"".join(p.read_bytes() for p in files)
    for material in (a, b):
        assert material.key not in raw and material.key.hex().encode() not in raw
    with db.session() as session:
        rows = {r.key_id: r for r in session.scalars(select(WatermarkKey))}
        rows[a.key_id].key_encrypted, rows[b.key_id].key_encrypted = (
            rows[b.key_id].key_encrypted,
            rows[a.key_id].key_encrypted,
        )
    with pytest.raises(Exception):  # noqa: B017 - AES-GCM's InvalidTag: the ciphertexts were swapped
        keys.all_keys_for(None)
    with pytest.raises(Exception):  # noqa: B017 - and another master secret opens nothing
        WatermarkKeyring(db, Keyring(b"n" * 48), WatermarkSettings()).every_key()


def test_rotation_keeps_retired_keys_for_detection(sealer, db, keys):
    old = keys.ensure_default_key()
    text = generate(sealer, [old], 200, seed=3)[0]
    new = keys.rotate(None, ADMIN)
    assert new.key_id != old.key_id and keys.active_key_for(None) == new
    candidates = keys.all_keys_for(None)
    assert [(k.key_id, k.status) for k in candidates] == [(new.key_id, "active"), (old.key_id, "retired")]
    assert detect(text, candidates).key_id == old.key_id
    with db.session() as session:
        retired = session.get(WatermarkKey, old.key_id)
        assert retired.status == "retired" and retired.retired_at is not None
        actions = [(e.action, e.target_id, e.actor_id) for e in session.scalars(select(AuditEvent))]
    assert ("watermark.key.create", old.key_id, "cli") in actions
    assert ("watermark.key.rotate", new.key_id, ADMIN.id) in actions


def test_org_keys_are_used_for_their_org_and_never_tried_for_another(sealer, keys, orgs):
    (alpha, _), (beta, _) = orgs["alpha"], orgs["beta"]
    default = keys.ensure_default_key()
    alpha_key = keys.rotate(alpha, ADMIN)
    assert keys.active_key_for(alpha) == alpha_key and keys.active_key_for(beta) == default
    assert {k.key_id for k in keys.all_keys_for(alpha)} == {alpha_key.key_id, default.key_id}
    assert {k.key_id for k in keys.all_keys_for(beta)} == {default.key_id}
    text = generate(sealer, [alpha_key], 200, seed=5)[0]
    assert detect(text, keys.all_keys_for(alpha)).key_id == alpha_key.key_id
    assert not detect(text, keys.all_keys_for(beta)).detected


def test_changing_the_configuration_rotates_the_default_key(db, keyring, keys):
    first = keys.ensure_default_key()
    changed = WatermarkKeyring(db, keyring, WatermarkSettings(scheme="gumbel", width=3))
    second = changed.ensure_default_key()
    assert second.key_id != first.key_id and (second.scheme, second.width) == ("gumbel", 3)
    assert {k.status for k in changed.all_keys_for(None) if k.key_id == first.key_id} == {"retired"}


def test_exemptions_are_audited_and_cached(db, keyring, keys, orgs, clock):
    org_id, api_key_id = orgs["alpha"]
    keys.ensure_default_key()
    replica = WatermarkKeyring(db, keyring, WatermarkSettings(cache_seconds=10), clock=clock)
    assert replica.for_request(org_id, api_key_id) is not None
    with pytest.raises(InvalidRequest):
        keys.exempt(api_key_id, ADMIN, "  ")
    with pytest.raises(NotFound):
        keys.exempt("key_missing", ADMIN, "evaluation")
    keys.exempt(api_key_id, ADMIN, "red-team evaluation")
    assert keys.is_exempt(api_key_id) and keys.for_request(org_id, api_key_id) is None
    assert replica.for_request(org_id, api_key_id) is not None  # another replica: within its cache window
    clock.now += 11
    assert replica.for_request(org_id, api_key_id) is None
    keys.unexempt(api_key_id, ADMIN, "done")
    assert not keys.is_exempt(api_key_id) and not keys.is_exempt(None)
    with db.session() as session:
        rows = session.scalars(select(AuditEvent))
        events = [(e.action, e.target_id, e.org_id, e.details.get("reason")) for e in rows]
    assert ("watermark.exempt", api_key_id, org_id, "red-team evaluation") in events
    assert ("watermark.unexempt", api_key_id, org_id, "done") in events


def test_disabled_watermarking_marks_nothing(db, keyring):
    off = WatermarkKeyring(db, keyring, WatermarkSettings(enabled=False))
    assert off.for_request(None, None) is None


def test_migration_matches_the_models(db):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from server.storage.base import all_tables

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), all_tables())
    mine = [d for d in diff if "watermark" in repr(d)]
    assert mine == []
