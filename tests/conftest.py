"""Fixtures every test package may use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model, converted once into the repository's data directory (`make serve` does
    the same), so every test that needs its weights or tokenizer finds them, in any order."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVER_")}
    out = subprocess.run(
        [sys.executable, "-m", "server", "models", "import-default", "--json"],
        cwd=REPO,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return Path(json.loads(out.stdout.strip().splitlines()[-1])["path"])
