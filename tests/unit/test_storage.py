"""Migrations and model-version records, against SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from sqlalchemy import inspect

from server.settings import REPO_ROOT
from server.storage.db import Database
from server.storage.migrate import current_revision, head_revision, upgrade
from tests.storage_backends import database_url  # noqa: F401 - fixture


def test_upgrade_is_idempotent_and_reaches_head(database_url):  # noqa: F811
    upgrade(database_url)
    upgrade(database_url)
    db = Database(database_url)
    try:
        assert current_revision(db) == head_revision(database_url)
        assert "model_versions" in inspect(db.engine).get_table_names()
    finally:
        db.dispose()


def test_cli_db_upgrade_and_current(tmp_path):
    env_url = f"sqlite:///{tmp_path / 'cli.db'}"
    run = [sys.executable, "-m", "server", "db"]
    env = {"SERVER_DATABASE_URL": env_url, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([*run, "upgrade"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*run, "current"], env=env, capture_output=True, text=True, timeout=120)
    assert f'"current": "{head_revision(env_url)}"' in out.stdout, out.stdout + out.stderr


def _subcommands(parser=None, prefix=()):  # type: ignore[no-untyped-def]
    """Every command path of `python -m server`, from the parser itself (so none is forgotten)."""
    import argparse

    from server.cli import build_parser

    parser = parser or build_parser()
    yield list(prefix)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, (*prefix, name))


@pytest.mark.parametrize("argv", list(_subcommands()), ids=lambda a: " ".join(a) or "(root)")
def test_every_subcommand_has_help(argv):
    out = subprocess.run([sys.executable, "-m", "server", *argv, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage:" in out.stdout


def test_importing_server_does_not_import_heavy_dependencies():
    code = (
        "import sys, server.app, server.cli, server.api.chat.serving; "
        "print(sorted(m for m in ('vllm', 'torch', 'transformers', 'triton') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_vllm_is_imported_in_exactly_one_module():
    grep = shutil.which("grep")
    out = subprocess.run(
        [grep, "-rlE", r"^\s*(from|import) vllm", "server", "kernels"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert out.stdout.split() == ["server/engine/vllm_engine.py"]
