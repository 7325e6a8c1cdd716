"""The registry service on SQLite and PostgreSQL: states, alias moves, rollback and their audit events."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from server.audit.models import AuditEvent
from server.audit.service import Actor
from server.registry import catalog
from server.registry.models import ModelVersion
from server.registry.signing import VerificationFailed
from server.registry.store import BlobStore
from server.storage.db import Database
from server.storage.migrate import upgrade
from tests.registry.conftest import build_model
from tests.storage_backends import database_url  # noqa: F401

ACTOR = Actor(type="user", id="operator-1")
PROVENANCE = {"source": "local", "base_model": "none", "datasets": ["synthetic"]}


@pytest.fixture
def db(database_url):  # noqa: F811
    upgrade(database_url)
    database = Database(database_url)
    yield database
    database.dispose()


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "data")


def _import(db, store, signer, folder) -> dict:
    with db.session() as s:
        return catalog.import_version(s, store, "tiny", folder, provenance=PROVENANCE, signer=signer, actor=ACTOR)


def _ready(db, store, trust, version: str) -> None:
    """imported -> verified -> evaluated."""
    with db.session() as s:
        catalog.verify_version(s, store, "tiny", version, trust=trust, actor=ACTOR)
        catalog.record_evaluation(s, "tiny", version, {"accuracy": 0.9}, True, ACTOR)


def test_lifecycle_promote_and_rollback(db, store, signer, trust, tmp_path) -> None:
    v1 = _import(db, store, signer, build_model(tmp_path / "m1"))
    assert (v1["version"], v1["state"], v1["path"]) == ("v1", "imported", str(store.path_for(v1["digest"])))
    with db.session() as s:
        assert catalog.active_digests(s, ["tiny", "nope"]) == {"tiny": None, "nope": None}  # nothing promoted
    with db.session() as s, pytest.raises(catalog.InvalidTransition, match="only an evaluated version"):
        catalog.promote(s, "tiny", "v1", ACTOR)
    with db.session() as s, pytest.raises(catalog.InvalidTransition, match="only a verified version"):
        catalog.record_evaluation(s, "tiny", "v1", {}, True, ACTOR)
    _ready(db, store, trust, "v1")
    with db.session() as s:
        assert catalog.promote(s, "tiny", "v1", ACTOR)["state"] == "active"

    v2 = _import(db, store, signer, build_model(tmp_path / "m2", seed=5))
    assert v2["version"] == "v2"
    _ready(db, store, trust, "v2")
    with db.session() as s:
        catalog.promote(s, "tiny", v2["digest"][:12], ACTOR)
        shown = catalog.show(s, "tiny")
    assert shown["active"]["digest"] == v2["digest"] and shown["active"]["path"] == str(store.path_for(v2["digest"]))
    assert shown["rollback_to"] == "v1"
    with db.session() as s:
        assert catalog.active_digests(s, ["tiny"]) == {"tiny": v2["digest"]}
    assert [v["state"] for v in shown["versions"]] == ["retired", "active"]

    with db.session() as s:
        assert catalog.rollback(s, "tiny", ACTOR)["version"] == "v1"
        shown = catalog.show(s, "tiny")
    assert shown["active"]["version"] == "v1" and [v["state"] for v in shown["versions"]] == ["active", "retired"]
    with db.session() as s:
        assert catalog.active_digests(s, ["tiny"]) == {"tiny": v1["digest"]}
    with db.session() as s, pytest.raises(catalog.InvalidTransition, match="no earlier version"):
        catalog.rollback(s, "tiny", ACTOR)
    with db.session() as s, pytest.raises(catalog.InvalidTransition, match="is retired"):
        catalog.promote(s, "tiny", "v2", ACTOR)  # a retired version comes back only by rollback

    with db.session() as s:
        events = [(e.action, e.outcome) for e in s.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert events.count(("registry.promote", "success")) == 2
    assert ("registry.rollback", "success") in events and ("registry.import", "success") in events


def test_failed_evaluation_blocks_promotion(db, store, signer, trust, model) -> None:
    _import(db, store, signer, model)
    with db.session() as s:
        catalog.verify_version(s, store, "tiny", "v1", trust=trust, actor=ACTOR)
        view = catalog.record_evaluation(s, "tiny", "v1", {"accuracy": 0.1}, False, ACTOR)
    assert view["state"] == "verified" and view["eval_passed"] is False
    with db.session() as s, pytest.raises(catalog.InvalidTransition):
        catalog.promote(s, "tiny", "v1", ACTOR)
    with db.session() as s:  # the latest evaluation decides: a pass, then a failure, leaves it unpromotable
        assert catalog.record_evaluation(s, "tiny", "v1", {"accuracy": 0.9}, True, ACTOR)["state"] == "evaluated"
        assert catalog.record_evaluation(s, "tiny", "v1", {"accuracy": 0.1}, False, ACTOR)["state"] == "verified"
    with db.session() as s, pytest.raises(catalog.InvalidTransition):
        catalog.promote(s, "tiny", "v1", ACTOR)


def test_reimport_is_idempotent_and_legacy_rows_are_adopted(db, store, signer, model, tmp_path) -> None:
    with db.session() as s:  # what versions.resolve_model records for a configured folder
        s.add(ModelVersion(name="tiny", version="v1", digest=_digest(model), path=str(model), size_bytes=1))
    first = _import(db, store, signer, model)
    assert first["version"] == "v1" and first["path"] == str(store.path_for(first["digest"]))
    again = _import(db, store, signer, build_model(tmp_path / "copy"))
    assert again == first


def test_verify_refuses_tampering_and_unpinned_keys(db, store, signer, trust, keys, model, tmp_path) -> None:
    from server.registry.signing import Trust

    view = _import(db, store, signer, model)
    with db.session() as s, pytest.raises(VerificationFailed, match="not pinned"):
        catalog.verify_version(s, store, "tiny", "v1", trust=Trust(public_keys=(keys["other_pub"],)), actor=ACTOR)
    copy = build_model(tmp_path / "copy")
    (copy / "config.json").write_text("{}")
    with db.session() as s, pytest.raises(VerificationFailed, match="modified: config.json"):
        catalog.verify_version(s, store, "tiny", "v1", trust=trust, actor=ACTOR, path=copy)
    (store.meta_dir(view["digest"]) / "bom.json").chmod(0o644)
    (store.meta_dir(view["digest"]) / "bom.json").write_text("{}")
    with db.session() as s, pytest.raises(VerificationFailed, match="altered"):
        catalog.verify_version(s, store, "tiny", "v1", trust=trust, actor=ACTOR)
    catalog.audit_failure(db, ACTOR, "registry.verify", "tiny", "bom altered")
    with db.session() as s:
        assert catalog.show(s, "tiny")["versions"][0]["state"] == "imported"
        failures = s.scalars(select(AuditEvent).where(AuditEvent.outcome == "failure")).all()
    assert [(e.action, e.details["reason"]) for e in failures] == [("registry.verify", "bom altered")]


def test_unknown_names(db) -> None:
    with db.session() as s:
        with pytest.raises(catalog.UnknownModel):
            catalog.show(s, "nope")
        with pytest.raises(catalog.UnknownModel):
            catalog.promote(s, "nope", "v1", ACTOR)
        assert catalog.list_models(s) == [] and catalog.active_version(s, "nope") is None


def _digest(folder) -> str:
    from server.registry.digest import digest_folder

    return digest_folder(folder).root


def test_bootstrap_promotes_once(db, store, signer, trust, model) -> None:
    kwargs = dict(
        provenance={"source": "embedded"}, signer=signer, trust=trust, evaluation={"smoke": "ok"}, actor=ACTOR
    )
    with db.session() as s:
        first = catalog.bootstrap(s, store, "default", model, **kwargs)
    assert first["state"] == "active" and first["eval_results"] == {"smoke": "ok"}
    with db.session() as s:
        assert catalog.bootstrap(s, store, "default", model, **kwargs) == first
        assert [m["name"] for m in catalog.list_models(s)] == ["default"]


def test_same_bytes_under_two_names_share_signature_and_bom(db, store, signer, trust, model) -> None:
    first = _import(db, store, signer, model)
    with db.session() as s:
        second = catalog.import_version(s, store, "alias", model, provenance={}, signer=signer, actor=ACTOR)
        assert second["digest"] == first["digest"] and second["bom_digest"] == first["bom_digest"]
        catalog.verify_version(s, store, "tiny", "v1", trust=trust, actor=ACTOR)
        assert catalog.verify_version(s, store, "alias", "v1", trust=trust, actor=ACTOR).root == first["digest"]
        assert catalog.show(s, "alias")["versions"][0]["signer"] == first["signer"]


def test_resigning_with_a_rotated_key(db, store, signer, keys, model) -> None:
    from server.registry.signing import Signer, Trust, private_key_fingerprint

    _import(db, store, signer, model)
    with db.session() as s:
        view = catalog.sign_version(s, store, "tiny", "v1", Signer(private_key=keys["other"]), ACTOR)
        assert view["signer"] == private_key_fingerprint(keys["other"])
        with pytest.raises(VerificationFailed, match="not pinned"):
            catalog.verify_version(s, store, "tiny", "v1", trust=Trust(public_keys=(keys["pinned_pub"],)), actor=ACTOR)
        rotated = Trust(public_keys=(keys["other_pub"],))
        assert catalog.verify_version(s, store, "tiny", "v1", trust=rotated, actor=ACTOR).signer == view["signer"]
