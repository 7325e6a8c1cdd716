"""What the engine loads: the active, signature-verified version of each configured model (fail closed).

On the first start for a model name (no active version yet) the configured folder, or the embedded default
model, is imported into the read-only blob store, signed with the local signing key, verified and promoted
("trust on first use", said in the log and the audit trail). Every later start serves the registry's active
version, re-verified against its signature with pinned signers only; the configured path is not read again,
so changing it needs `python -m server models import` and `promote`. A version that does not verify is
refused with the reason: the engine does not start with it and nothing falls back to unverified bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from server.audit.service import Actor
from server.engine.types import ModelInfo
from server.registry.signing import Signer, Trust, VerificationFailed, VerifiedManifest, ensure_signing_key
from server.registry.store import BlobStore
from server.settings import ModelSettings, Settings
from server.storage.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    info: ModelInfo
    manifest: VerifiedManifest


def signing_key_path(settings: Settings) -> Path:
    return settings.registry.signing_key or settings.data_dir / "registry" / "keys" / "signing.pem"


def signer(settings: Settings) -> Signer:
    key = signing_key_path(settings)
    public, created = ensure_signing_key(key)
    if created:
        log.warning(
            "generated a model signing key at %s; its public key %s is pinned for this data directory", key, public
        )
    return Signer(private_key=key)


def trust(settings: Settings) -> Trust:
    pinned = list(settings.registry.pinned_public_keys)
    if not pinned:
        if settings.environment == "production":
            raise VerificationFailed("registry.pinned_public_keys is empty: production needs explicit signers")
        pinned = [signing_key_path(settings).with_suffix(".pub")]
    return Trust(public_keys=tuple(pinned), certificates=tuple(settings.registry.pinned_ca_certificates))


def load_verified(settings: Settings, model: ModelSettings, db: Database, *, progress: bool = True) -> LoadedModel:
    from server.registry import catalog
    from server.registry.versions import model_folder

    store = BlobStore(settings.data_dir)
    pinned = trust(settings)
    with db.session() as session:
        active = catalog.active_version(session, model.name)
    if active is None:
        folder = model_folder(settings, model, progress=progress)
        log.warning(
            "model %s has no active version: importing %s, signing and promoting it (first use)", model.name, folder
        )
        provenance = {"source": str(folder), "how": "first start (trust on first use)"}
        with db.session() as session:
            active = catalog.bootstrap(
                session,
                store,
                model.name,
                folder,
                provenance=provenance,
                signer=signer(settings),
                trust=pinned,
                evaluation={
                    "suite": None,
                    "passed": True,
                    "trust_on_first_use": True,
                    "note": "bootstrap: trust on first use, suite not run (first import of the configured model; "
                    "later versions are promoted only after `models evaluate` ran the suite)",
                },
                actor=Actor.system(),
            )
    try:
        manifest = store.verify(active["digest"], pinned)
    except VerificationFailed as exc:
        catalog.audit_failure(db, Actor.system(), "registry.load", model.name, exc.reason)
        raise
    info = ModelInfo(
        name=model.name,
        version=active["version"],
        digest=manifest.root,
        path=manifest.folder,
        max_model_len=model.max_model_len,
        pool=model.pool,
        created=int(datetime.fromisoformat(active["created_at"]).timestamp()),
        integrity_check=manifest.assert_unchanged,
    )
    return LoadedModel(info, manifest)


def active_digests(settings: Settings, db: Database) -> dict[str, str | None]:
    """Each configured model's active version digest (what every replica should serve), None if it has none."""
    from server.registry import catalog

    with db.session() as session:
        return catalog.active_digests(session, [m.name for m in settings.models])
