"""The registry service: model versions, their lifecycle states, and the alias that names the active one.

States move one way: ``imported`` (stored and signed) -> ``verified`` (its stored bytes matched its signature
with a pinned signer, and its BOM signature and digest checked) -> ``evaluated`` (evaluation recorded as
passed) -> ``active`` (the alias points at it) -> ``retired`` (another version was promoted, or it was rolled
back). The one way back is ``rollback``, which re-activates the version the active one replaced. A version's
bytes, digest and label never change: promotion and rollback move only the alias (``registry_models``).

Every function works in the caller's session and writes its audit event there, so the change and its event
commit together. A refused operation raises ``RegistryError`` (or ``VerificationFailed``) and its session
rolls back; record the refusal with ``audit_failure``, which uses a session of its own.
Promotion and rollback lock the model's row (``SELECT ... FOR UPDATE`` on PostgreSQL), so replicas acting at
once take turns instead of both moving the alias from the same starting point.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.audit.service import Actor, record
from server.registry.bom import bom_bytes, bom_model_digest, build_bom, sign_bom, validate_bom, verify_bom
from server.registry.models import ModelVersion, ModelVersionMeta, RegistryModel
from server.registry.signing import Signer, Trust, VerificationFailed, VerifiedManifest, private_key_fingerprint
from server.registry.store import BlobStore
from server.storage.base import utcnow
from server.storage.db import Database

__all__ = [
    "STATES",
    "InvalidTransition",
    "RegistryError",
    "UnknownModel",
    "active_version",
    "audit_failure",
    "bootstrap",
    "import_version",
    "list_models",
    "promote",
    "record_evaluation",
    "rollback",
    "show",
    "sign_version",
    "verify_version",
]

STATES = ("imported", "verified", "evaluated", "active", "retired")


class RegistryError(Exception):
    """A registry operation was refused; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownModel(RegistryError):
    """No such model or version in the registry."""


class InvalidTransition(RegistryError):
    """The version is not in a state that allows the operation."""


def import_version(
    session: Session,
    store: BlobStore,
    name: str,
    src_folder: Path,
    *,
    provenance: dict[str, Any] | None,
    signer: Signer,
    actor: Actor,
) -> dict[str, Any]:
    """Store ``src_folder`` (policy-checked, content-addressed), sign it and its BOM, and record the version.

    Importing bytes already recorded under ``name`` returns that version unchanged. A version recorded
    before the registry existed (same bytes, no registry facts) is adopted: it keeps its label, and its path
    becomes the stored copy. Bytes already stored under another name keep their one signature and BOM (the
    BOM's subject names the first name and version; its digest is the same); ``verify_version`` then checks
    them and records the signer.
    """
    stored = store.import_folder(Path(src_folder))
    row = session.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.digest == stored.digest))
    if row is not None and session.get(ModelVersionMeta, row.id) is not None:
        record(session, actor, "registry.import", "success", **_target(name), version=row.version, existing=True)
        return _view(session, row)
    if row is None:
        count = session.scalar(select(func.count(ModelVersion.id)).where(ModelVersion.name == name)) or 0
        row = ModelVersion(name=name, version=f"v{count + 1}", digest=stored.digest, path="", size_bytes=0)
        session.add(row)
    row.path, row.size_bytes = str(stored.path), stored.size_bytes
    session.flush()
    signed_by: str | None = None
    if _has_meta(store, stored.digest):  # the same bytes stored under another name: one signature, one BOM
        data = store.read_meta(stored.digest, "bom.json")
    else:
        store.sign(stored.digest, signer)
        bom = build_bom(
            name=name,
            version=row.version,
            root=stored.digest,
            files=stored.files,
            folder=stored.path,
            provenance=provenance,
        )
        validate_bom(bom)
        data = bom_bytes(bom)
        store.write_meta(stored.digest, "bom.json", data)
        store.write_meta(stored.digest, "bom.sig", sign_bom(data, signer.private_key))
        signed_by = _signer_fingerprint(signer)
    session.add(
        ModelVersionMeta(
            version_id=row.id,
            state="imported",
            signer_fingerprint=signed_by,
            provenance=dict(provenance or {}),
            bom_digest=hashlib.sha256(data).hexdigest(),
        )
    )
    if session.get(RegistryModel, name) is None:
        session.add(RegistryModel(name=name))
    session.flush()
    record(session, actor, "registry.import", "success", **_target(name), version=row.version, digest=row.digest)
    return _view(session, row)


def sign_version(
    session: Session, store: BlobStore, name: str, version: str, signer: Signer, actor: Actor
) -> dict[str, Any]:
    """Re-sign a version and its BOM (key rotation); the bytes must still hash to the version's digest."""
    row, meta = _version(session, name, version)
    store.sign(row.digest, signer)
    store.write_meta(row.digest, "bom.sig", sign_bom(store.read_meta(row.digest, "bom.json"), signer.private_key))
    meta.signer_fingerprint = _signer_fingerprint(signer)
    record(
        session, actor, "registry.sign", "success", **_target(name), version=row.version, signer=meta.signer_fingerprint
    )
    return _view(session, row)


def verify_version(
    session: Session,
    store: BlobStore,
    name: str,
    version: str | None,
    *,
    trust: Trust,
    actor: Actor,
    path: Path | None = None,
) -> VerifiedManifest:
    """Verify a version (default: the active one) or another folder (``path``) against its signature and BOM.

    Checking the stored copy of an ``imported`` version moves it to ``verified``.
    """
    row, meta = _version(session, name, version)
    manifest = store.verify(row.digest, trust, path=path)
    data = store.read_meta(row.digest, "bom.json")
    try:
        verify_bom(data, store.read_meta(row.digest, "bom.sig"), [*trust.public_keys, manifest.signer_public_key])
    except FileNotFoundError:
        raise VerificationFailed(f"{name} {row.version}: the BOM or its signature is missing") from None
    if hashlib.sha256(data).hexdigest() != meta.bom_digest or bom_model_digest(_json(data)) != row.digest:
        raise VerificationFailed(f"{name} {row.version}: the BOM is not the one recorded for this version")
    if path is None and meta.state == "imported":
        meta.state, meta.verified_at, meta.signer_fingerprint = "verified", utcnow(), manifest.signer
    record(
        session, actor, "registry.verify", "success", **_target(name), version=row.version, path=str(manifest.folder)
    )
    return manifest


def record_evaluation(
    session: Session, name: str, version: str, results: dict[str, Any], passed: bool, actor: Actor, **audit: Any
) -> dict[str, Any]:
    """Record evaluation results: a pass moves a verified version to ``evaluated``; a failure moves it (back)
    to ``verified``, so the latest evaluation is always the one that decides whether it may be promoted.

    ``audit`` adds details to the ``registry.evaluate`` event (server/registry/evaluation.py names the suite).
    """
    row, meta = _version(session, name, version)
    if meta.state not in ("verified", "evaluated"):
        raise InvalidTransition(f"{name} {row.version} is {meta.state}; only a verified version can be evaluated")
    meta.eval_results, meta.eval_passed, meta.evaluated_at = results, passed, utcnow()
    meta.state = "evaluated" if passed else "verified"
    outcome = "success" if passed else "failure"
    record(session, actor, "registry.evaluate", outcome, **_target(name), version=row.version, passed=passed, **audit)
    return _view(session, row)


def promote(session: Session, name: str, version: str, actor: Actor) -> dict[str, Any]:
    """Point the alias at an evaluated version; the previously active version is retired."""
    model = _locked_model(session, name)
    row, meta = _version(session, name, version)
    if meta.state != "evaluated":
        raise InvalidTransition(f"{name} {row.version} is {meta.state}; only an evaluated version can be promoted")
    previous = model.active_version_id
    if previous is not None:
        _set_state(session, previous, "retired")
    meta.state, meta.activated_at, meta.replaced_version_id = "active", utcnow(), previous
    model.active_version_id, model.previous_active_version_id, model.updated_at = row.id, previous, utcnow()
    record(
        session,
        actor,
        "registry.promote",
        "success",
        **_target(name),
        version=row.version,
        digest=row.digest,
        replaced=_label(session, previous),
    )
    return _view(session, row)


def rollback(session: Session, name: str, actor: Actor) -> dict[str, Any]:
    """Move the alias back to the version the active one replaced; the active version is retired."""
    model = _locked_model(session, name)
    if model.active_version_id is None:
        raise InvalidTransition(f"{name} has no active version to roll back")
    current = session.get(ModelVersionMeta, model.active_version_id)
    target_id = current.replaced_version_id if current is not None else None
    target = session.get(ModelVersionMeta, target_id) if target_id is not None else None
    if target is None or target.state != "retired":
        raise InvalidTransition(f"{name} has no earlier version to roll back to")
    _set_state(session, model.active_version_id, "retired")
    target.state, target.activated_at = "active", utcnow()
    model.active_version_id, model.previous_active_version_id = target.version_id, target.replaced_version_id
    model.updated_at = utcnow()
    row = session.get(ModelVersion, target.version_id)
    assert row is not None
    record(
        session,
        actor,
        "registry.rollback",
        "success",
        **_target(name),
        version=row.version,
        digest=row.digest,
        rolled_back=_label(session, current.version_id if current else None),
    )
    return _view(session, row)


def bootstrap(
    session: Session,
    store: BlobStore,
    name: str,
    folder: Path,
    *,
    provenance: dict[str, Any],
    signer: Signer,
    trust: Trust,
    evaluation: dict[str, Any],
    actor: Actor,
) -> dict[str, Any]:
    """First start with no active version: import, sign, verify, record ``evaluation`` (passed) and promote.

    Returns the active version unchanged when ``name`` already has one, so it is safe on every start.
    """
    active = active_version(session, name)
    if active is not None:
        return active
    view = import_version(session, store, name, folder, provenance=provenance, signer=signer, actor=actor)
    verify_version(session, store, name, view["version"], trust=trust, actor=actor)
    record_evaluation(session, name, view["version"], evaluation, True, actor)
    return promote(session, name, view["version"], actor)


def active_version(session: Session, name: str) -> dict[str, Any] | None:
    """The active version of ``name`` (what the engine should load), or ``None``."""
    model = session.get(RegistryModel, name)
    if model is None or model.active_version_id is None:
        return None
    row = session.get(ModelVersion, model.active_version_id)
    return _view(session, row) if row is not None else None


def active_digests(session: Session, names: list[str]) -> dict[str, str | None]:
    """Each named model's active version digest, None without one: one query, no version metadata (replicas
    poll it every second to follow promotions)."""
    rows = session.execute(
        select(RegistryModel.name, ModelVersion.digest)
        .join(ModelVersion, ModelVersion.id == RegistryModel.active_version_id)
        .where(RegistryModel.name.in_(names))
    )
    found = {name: digest for name, digest in rows}  # not dict(rows): a Result has keys() (its columns)
    return {name: found.get(name) for name in names}


def show(session: Session, name: str) -> dict[str, Any]:
    """A model: its active version (digest, path...), where rollback goes, and every version."""
    model = session.get(RegistryModel, name)
    if model is None:
        raise UnknownModel(f"no model named {name!r} in the registry")
    rows = session.scalars(select(ModelVersion).where(ModelVersion.name == name).order_by(ModelVersion.id))
    return {
        "name": name,
        "active": active_version(session, name),
        "rollback_to": _label(session, model.previous_active_version_id),
        "versions": [_view(session, r) for r in rows],
    }


def list_models(session: Session) -> list[dict[str, Any]]:
    names = session.scalars(select(RegistryModel.name).order_by(RegistryModel.name))
    return [show(session, n) for n in names]


def audit_failure(db: Database, actor: Actor, action: str, name: str, reason: str) -> None:
    """Record a refused operation in its own transaction (the refused one rolled back)."""
    with db.session() as session:
        record(session, actor, action, "failure", **_target(name), reason=reason[:2000])


def _version(session: Session, name: str, version: str | None) -> tuple[ModelVersion, ModelVersionMeta]:
    """A version by label ("v2"), digest or digest prefix (8+ hex); ``None`` means the active one."""
    if version is None:
        model = session.get(RegistryModel, name)
        if model is None or model.active_version_id is None:
            raise UnknownModel(f"{name!r} has no active version")
        row = session.get(ModelVersion, model.active_version_id)
    else:
        query = select(ModelVersion).where(ModelVersion.name == name)
        prefix = len(version) >= 8
        rows = [
            r
            for r in session.scalars(query)
            if version in (r.version, r.digest) or (prefix and r.digest.startswith(version))
        ]
        row = rows[0] if len(rows) == 1 else None
    meta = session.get(ModelVersionMeta, row.id) if row is not None else None
    if row is None or meta is None:
        raise UnknownModel(f"no registered version {version or 'active'!r} of model {name!r}")
    return row, meta


def _locked_model(session: Session, name: str) -> RegistryModel:
    model = session.scalar(select(RegistryModel).where(RegistryModel.name == name).with_for_update())
    if model is None:
        raise UnknownModel(f"no model named {name!r} in the registry")
    return model


def _set_state(session: Session, version_id: int, state: str) -> None:
    meta = session.get(ModelVersionMeta, version_id)
    if meta is not None:
        meta.state = state
        if state == "retired":
            meta.retired_at = utcnow()


def _label(session: Session, version_id: int | None) -> str | None:
    row = session.get(ModelVersion, version_id) if version_id is not None else None
    return row.version if row is not None else None


def _view(session: Session, row: ModelVersion) -> dict[str, Any]:
    meta = session.get(ModelVersionMeta, row.id)
    return {
        "name": row.name,
        "version": row.version,
        "digest": row.digest,
        "path": row.path,
        "size_bytes": row.size_bytes,
        "created_at": row.created_at.isoformat(),
        "state": meta.state if meta else "unregistered",
        "signer": meta.signer_fingerprint if meta else None,
        "provenance": meta.provenance if meta else {},
        "eval_passed": meta.eval_passed if meta else None,
        "eval_results": meta.eval_results if meta else None,
        "bom_digest": meta.bom_digest if meta else None,
    }


def _has_meta(store: BlobStore, digest: str) -> bool:
    meta = store.meta_dir(digest)
    return all((meta / name).is_file() for name in ("signature.sig", "bom.json", "bom.sig"))


def _signer_fingerprint(signer: Signer) -> str:
    return private_key_fingerprint(signer.private_key)


def _target(name: str) -> dict[str, str]:
    return {"target_type": "model", "target_id": name[:128]}


def _json(data: bytes) -> dict[str, Any]:
    return json.loads(data)
