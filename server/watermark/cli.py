"""`python -m server watermark …`: detection, keys, rotation and exemptions from the operator's command line.

`detect --model M --file F`: the operator holds the database and the master secret, so the command may try
every key of every organization (or, with `org_id`, exactly what that organization's API callers may try).
The multiple testing correction counts every key tried, so a larger key set needs a stronger signal, never less.
Exit status: 0 watermark detected, 1 not detected, 2 the input could not be read or tested.
`keys`, `rotate [--org ID]`, `exempt KEY_ID --reason R`, `unexempt KEY_ID`: audited as the system actor.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.settings import Settings


@contextmanager
def _keyring(settings: Settings) -> Iterator[Any]:
    """The watermark keys over the migrated database and the master secret (the identity commands' `_open`)."""
    from server.identity.cli import _open
    from server.watermark.keys import WatermarkKeyring

    with _open(settings) as (db, keyring):
        yield WatermarkKeyring(db, keyring, settings.watermark)


def manage_cli(
    settings: Settings, action: str, *, org_id: str | None = None, api_key_id: str = "", reason: str = ""
) -> int:
    """keys | rotate | exempt | unexempt; prints JSON. Exit 1 with the reason when refused."""
    from server.audit.service import Actor
    from server.errors import ServerError

    with _keyring(settings) as keys:
        try:
            if action == "keys":
                result: dict[str, Any] = keys.describe(None, everything=True)
            elif action == "rotate":
                result = _key_view(keys.rotate(org_id, Actor.system(), reason or "rotation"))
            elif action == "exempt":
                keys.exempt(api_key_id, Actor.system(), reason)
                result = {"api_key_id": api_key_id, "exempt": True}
            else:
                keys.unexempt(api_key_id, Actor.system(), reason)
                result = {"api_key_id": api_key_id, "exempt": False}
        except ServerError as exc:
            print(exc.message, file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    return 0


def _key_view(material: Any) -> dict[str, Any]:
    return {"key_id": material.key_id, "org_id": material.org_id, "scheme": material.scheme, "status": material.status}


def detect_cli(settings: Settings, model: str, file: str | Path, *, org_id: str | None = None, out: Any = None) -> int:
    """Detect a watermark in the text of `file` ("-" for stdin) with `model`'s tokenizer; print JSON."""
    from server.engine.tokenizer import HfTokenizer
    from server.registry.versions import model_folder
    from server.watermark.detector import detect

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
    wm = settings.watermark
    with _keyring(settings) as keys:
        candidates = keys.all_keys_for(org_id) if org_id is not None else keys.every_key()
    tokenizer = HfTokenizer(model_folder(settings, configured, progress=False))
    result = detect(
        tokenizer.encode(text), candidates, threshold=wm.detect_p_threshold, min_tokens=wm.detect_min_tokens
    )
    print(json.dumps(result.as_dict()), file=out)
    return 0 if result.detected else 1
