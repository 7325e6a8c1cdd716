"""Where a configured model's bytes come from before the registry imports them: a configured local folder,
or the embedded default model (converted once). What is served is decided by server/registry/loader.py."""

from __future__ import annotations

import logging
from pathlib import Path

from server.registry.default_model import DEFAULT_MODEL_DIRNAME, ensure_default_model
from server.settings import ModelSettings, Settings

log = logging.getLogger(__name__)


def model_folder(settings: Settings, model: ModelSettings, *, progress: bool = True) -> Path:
    """The folder the engine loads: the configured path, or the embedded default (converted once)."""
    if model.path is not None:
        path = model.path.expanduser().resolve()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {model.name!r}: {path} is not a HF-format model folder (no config.json)")
        return path
    return ensure_default_model(settings.models_dir / DEFAULT_MODEL_DIRNAME, progress=progress)
