"""The folder digest must equal model-signing's root digest, and refuse folders it cannot vouch for."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from model_signing import hashing
from model_signing._signing.signing import Payload

from server.registry.digest import ModelDigest, UnsafeModelFolder, digest_folder

# Names where component order differs from plain string order: "a/b..." sorts before "a-b" and "a.txt"
# by parts, after them by string ("-" < "." < "/").
FILES = {
    "a.txt": b"alpha",
    "a-b": b"dash",
    "a/b": b"nested",
    "a/b.d/c": b"deeper",
    "a/b-c": b"sibling",
    "A": b"upper case",
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": os.urandom(3 * 1024 * 1024 + 17),  # spans several reads of an odd size
    "empty": b"",
    ".gitattributes": b"*.safetensors filter=lfs",
    ".git/HEAD": b"ref: refs/heads/main",
}


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def _model_signing_root(folder: Path) -> str:
    config = hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)
    statement = Payload(config.hash(folder)).statement
    return statement.pb.subject[0].digest["sha256"]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return _write(tmp_path / "model", FILES)


def test_equals_model_signing_root_digest(model: Path) -> None:
    ours = digest_folder(model)
    assert ours.root == _model_signing_root(model)
    assert ours.short == ours.root[:12]


def test_orders_files_by_path_parts_not_strings(model: Path) -> None:
    paths = [f.path for f in digest_folder(model).files]
    assert paths.index("a/b") < paths.index("a-b") < paths.index("a.txt")
    assert paths != sorted(paths)  # the plain string order would differ, so the test means something
    assert len(paths) == len(FILES)


def test_file_entries_carry_size_and_sha256(model: Path) -> None:
    by_path = {f.path: f for f in digest_folder(model).files}
    for name, data in FILES.items():
        assert by_path[name].size == len(data)
        assert by_path[name].sha256 == hashlib.sha256(data).hexdigest()


def test_git_files_are_hashed_unless_ignored(model: Path) -> None:
    everything = digest_folder(model)
    assert {".git/HEAD", ".gitattributes"} <= {f.path for f in everything.files}
    trimmed = digest_folder(model, ignore=[".git", ".gitattributes"])
    # model-signing's default configuration leaves the git paths out; ignoring them matches it.
    default_ms = Payload(hashing.Config().hash(model)).statement.pb.subject[0].digest["sha256"]
    assert trimmed.root == default_ms != everything.root


def test_ignore_may_not_leave_the_folder(model: Path) -> None:
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(UnsafeModelFolder, match="relative"):
            digest_folder(model, ignore=[bad])


@pytest.mark.parametrize("link", ["link-to-file", "a/link-to-dir"])
def test_refuses_symlinks(model: Path, link: str) -> None:
    target = model / "config.json" if link == "link-to-file" else model / "a"
    (model / link).symlink_to(target)
    with pytest.raises(UnsafeModelFolder, match="symlink") as info:
        digest_folder(model)
    assert link.split("/")[-1] in str(info.value)


def test_refuses_symlinked_folder(model: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(model)
    with pytest.raises(UnsafeModelFolder, match="symlink"):
        digest_folder(tmp_path / "alias")


def test_refuses_fifo(model: Path) -> None:
    os.mkfifo(model / "pipe")
    with pytest.raises(UnsafeModelFolder, match="not a regular file"):
        digest_folder(model)


def test_refuses_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "only-dirs" / "sub").mkdir(parents=True)
    with pytest.raises(UnsafeModelFolder, match="no files"):
        digest_folder(tmp_path / "only-dirs")


def test_one_byte_changes_the_root(model: Path) -> None:
    before = digest_folder(model)
    data = bytearray((model / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (model / "model.safetensors").write_bytes(bytes(data))
    after = digest_folder(model)
    assert after.root != before.root
    assert after.root == _model_signing_root(model)


def test_renaming_a_file_changes_the_root(model: Path) -> None:
    before = digest_folder(model)
    (model / "a.txt").rename(model / "z.txt")  # moves it from the middle of the order to the end
    assert digest_folder(model).root != before.root


@pytest.mark.parametrize("workers", [1, 2, 3, 16])
def test_deterministic_across_worker_counts(model: Path, workers: int) -> None:
    assert digest_folder(model, workers=workers) == digest_folder(model, workers=1)


def test_result_is_immutable(model: Path) -> None:
    digest = digest_folder(model)
    assert isinstance(digest, ModelDigest)
    with pytest.raises(AttributeError):
        digest.root = "0" * 64  # type: ignore[misc]
