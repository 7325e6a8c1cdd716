"""The blob store: content addressed, deduplicated, read-only, and re-verified at load."""

from __future__ import annotations

import os
import stat

import pytest

from server.registry.digest import UnsafeModelFolder, digest_folder
from server.registry.format_policy import FormatRefused
from server.registry.signing import VerificationFailed
from server.registry.store import BlobStore
from tests.registry.conftest import SHARDS, build_model


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "data")


def test_import_is_content_addressed_and_deduplicated(store, model, tmp_path) -> None:
    first = store.import_folder(model)
    assert first.created and first.digest == digest_folder(model).root
    assert first.path == tmp_path / "data" / "registry" / "blobs" / "sha256" / first.digest
    copy = build_model(tmp_path / "elsewhere")  # same bytes, another place
    second = store.import_folder(copy)
    assert (second.digest, second.path, second.created) == (first.digest, first.path, False)
    other = store.import_folder(build_model(tmp_path / "other", seed=3))
    assert other.digest != first.digest
    assert os.listdir(store.tmp_dir) == []  # staging is always cleaned up


def test_stored_folder_is_read_only(store, model) -> None:
    stored = store.import_folder(model)
    modes = {p.relative_to(stored.path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in stored.path.rglob("*")}
    assert modes and set(modes.values()) == {0o444}
    assert stat.S_IMODE(stored.path.stat().st_mode) == 0o555


def test_symlink_in_the_source_is_refused_and_nothing_stored(store, model, tmp_path) -> None:
    (tmp_path / "secret").write_text("not a model file")
    (model / "notes.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafeModelFolder, match="notes.txt is a symlink"):
        store.import_folder(model)
    assert not any(store.blobs_dir.iterdir()) and os.listdir(store.tmp_dir) == []


def test_symlinked_source_folder_is_refused(store, model, tmp_path) -> None:
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    with pytest.raises(UnsafeModelFolder, match="is a symlink"):
        store.import_folder(tmp_path / "link")


def test_policy_refusal_stores_nothing(store, model) -> None:
    (model / "modeling.py").write_text("print('hi')")
    with pytest.raises(FormatRefused, match="modeling.py: code files are refused"):
        store.import_folder(model)
    assert not any(store.blobs_dir.iterdir())


def test_load_time_verification(store, model, signer, trust, keys) -> None:
    stored = store.import_folder(model)
    store.sign(stored.digest, signer)
    manifest = store.verify(stored.digest, trust)
    assert manifest.folder == stored.path and manifest.root == stored.digest
    assert stat.S_IMODE(store.signature_path(stored.digest).stat().st_mode) == 0o444
    # Someone with the server's uid makes a file writable and changes it: refused at the next load.
    shard = stored.path / SHARDS[0]
    os.chmod(shard, 0o644)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match=f"modified: {SHARDS[0]}"):
        store.verify(stored.digest, trust)
    with pytest.raises(VerificationFailed, match="changed after verification"):
        manifest.assert_unchanged()


def test_signing_refuses_a_tampered_stored_folder(store, model, signer) -> None:
    stored = store.import_folder(model)
    os.chmod(stored.path / "config.json", 0o644)
    (stored.path / "config.json").write_text("{}")
    with pytest.raises(VerificationFailed, match="it changed"):
        store.sign(stored.digest, signer)


def test_verifying_another_folder_against_a_version(store, model, signer, trust, tmp_path) -> None:
    stored = store.import_folder(model)
    store.sign(stored.digest, signer)
    copy = build_model(tmp_path / "copy")
    assert store.verify(stored.digest, trust, path=copy).folder == copy
    (copy / "generation_config.json").write_text("{}")
    with pytest.raises(VerificationFailed, match="modified: generation_config.json"):
        store.verify(stored.digest, trust, path=copy)


def test_digest_must_be_hex(store) -> None:
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        store.path_for("../../etc")
