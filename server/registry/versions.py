"""Resolve each configured model to a folder, a content digest and a version recorded in the database.

The digest is the OpenSSF model-signing root digest of the folder, so the version a response names is the
same one the supply-chain work signs. A folder whose digest is new for that model name becomes its next
version; the same bytes always map to the same version.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import func, select

from server.engine.types import ModelInfo
from server.registry.default_model import DEFAULT_MODEL_DIRNAME, ensure_default_model
from server.registry.digest import digest_folder
from server.registry.models import ModelVersion
from server.settings import ModelSettings, Settings
from server.storage.db import Database

log = logging.getLogger(__name__)


def model_folder(settings: Settings, model: ModelSettings, *, progress: bool = True) -> Path:
    """The folder the engine loads: the configured path, or the embedded default (converted once)."""
    if model.path is not None:
        path = model.path.expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {model.name!r}: {path} is not a HF-format model folder (no config.json)")
        return path
    return ensure_default_model(settings.models_dir / DEFAULT_MODEL_DIRNAME, progress=progress)


def resolve_model(settings: Settings, model: ModelSettings, db: Database, *, progress: bool = True) -> ModelInfo:
    path = model_folder(settings, model, progress=progress)
    started = time.perf_counter()
    digest = digest_folder(path)
    log.info(
        "model %s: digest %s over %d files in %.2fs",
        model.name,
        digest.root,
        len(digest.files),
        time.perf_counter() - started,
    )
    size = sum(f.size for f in digest.files)
    with db.session() as session:
        row = session.scalar(
            select(ModelVersion).where(ModelVersion.name == model.name, ModelVersion.digest == digest.root)
        )
        if row is None:
            count = session.scalar(select(func.count(ModelVersion.id)).where(ModelVersion.name == model.name)) or 0
            row = ModelVersion(
                name=model.name,
                version=model.version or f"v{count + 1}",
                digest=digest.root,
                path=str(path),
                size_bytes=size,
            )
            session.add(row)
            session.flush()
        elif model.version and row.version != model.version:
            raise ValueError(
                f"model {model.name!r}: configured version {model.version!r} but these bytes "
                f"were recorded as version {row.version!r}; versions are immutable"
            )
        version, created = row.version, int(row.created_at.timestamp())
    return ModelInfo(
        name=model.name,
        version=version,
        digest=digest.root,
        path=path,
        max_model_len=model.max_model_len,
        pool=model.pool,
        created=created,
    )
