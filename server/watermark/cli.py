"""`python -m server watermark detect --model M --file F`: detection from the operator's command line.

The operator holds the database and the master secret, so the command may try every key of every
organization (or, with `org_id`, exactly what that organization's API callers may try). The multiple
testing correction counts every key tried, so a larger key set needs a stronger signal, never less.
Exit status: 0 watermark detected, 1 not detected, 2 the input could not be read or tested.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from server.settings import Settings
from server.watermark.settings import WatermarkSettings


def watermark_settings(settings: Settings) -> WatermarkSettings:
    """`settings.watermark`, or the defaults while `Settings` has no watermark section."""
    configured = getattr(settings, "watermark", None)
    return configured if isinstance(configured, WatermarkSettings) else WatermarkSettings()


def detect_cli(settings: Settings, model: str, file: str | Path, *, org_id: str | None = None, out: Any = None) -> int:
    """Detect a watermark in the text of `file` ("-" for stdin) with `model`'s tokenizer; print JSON."""
    from server.engine.tokenizer import HfTokenizer
    from server.identity.secrets import Keyring, load_master_secret
    from server.registry.versions import model_folder
    from server.storage.db import Database
    from server.watermark.detector import detect
    from server.watermark.keys import WatermarkKeyring

    out = out or sys.stdout
    configured = next((m for m in settings.models if m.name == model), None)
    if configured is None:
        names = ", ".join(m.name for m in settings.models)
        print(f"unknown model {model!r}; configured: {names}", file=sys.stderr)
        return 2
    try:
        text = sys.stdin.read() if str(file) == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"cannot read {file}: {exc}", file=sys.stderr)
        return 2
    wm = watermark_settings(settings)
    db = Database(settings.sqlalchemy_url)
    try:
        keys = WatermarkKeyring(db, Keyring(load_master_secret(settings)), wm)
        candidates = keys.all_keys_for(org_id) if org_id is not None else keys.every_key()
    finally:
        db.dispose()
    tokenizer = HfTokenizer(model_folder(settings, configured, progress=False))
    result = detect(
        tokenizer.encode(text), candidates, threshold=wm.detect_p_threshold, min_tokens=wm.detect_min_tokens
    )
    print(json.dumps(result.as_dict()), file=out)
    return 0 if result.detected else 1
