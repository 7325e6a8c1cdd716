"""Content digest of a model folder, equal to the OpenSSF model-signing root digest.

Why this exists: the version a response names, the row in the registry and the signature the supply-chain
work produces must all refer to the same bytes. model-signing (file serialization, SHA-256) defines the
root digest as

    root = SHA-256( d(f1) || d(f2) || ... )    d(f) = raw 32-byte SHA-256 of file f's content

with files ordered as ``sorted()`` orders their ``pathlib.PurePosixPath`` relative paths: component by
component, not as plain strings ("a/b" sorts before "a-b" and "a.txt", although "/" > "-" and "."). We
compute that here without model-signing's machinery so that resolving a model at start-up is one cheap,
parallel pass, and so the walk can be stricter than model-signing's:

- Every symlink, device, FIFO or socket inside the folder is refused (``UnsafeModelFolder``), never
  followed or skipped: a served model must be exactly the bytes that were hashed. Files are opened
  relative to directory descriptors with ``O_NOFOLLOW`` at every step, so swapping a directory for a
  symlink mid-walk cannot lead the hash outside the folder.
- Nothing is ignored implicitly. model-signing by default leaves out ``.git/``, ``.gitattributes``,
  ``.github/`` and ``.gitignore``; we hash them like any other file. To match a signature made with
  model-signing's defaults, or to leave out a signature file stored in the folder, pass those paths in
  ``ignore`` (the same names model-signing would be given: a directory entry covers everything under it).

POSIX only (``O_NOFOLLOW``, ``O_DIRECTORY``, ``dir_fd``); the server runs on Linux.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["FileDigest", "ModelDigest", "UnsafeModelFolder", "digest_folder"]

_CHUNK = 8 * 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the walk must not hang the open; regular files ignore it.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

_Parts = tuple[str, ...]


class UnsafeModelFolder(ValueError):
    """The folder holds something we refuse to hash: a symlink, a non-regular file, a path escaping it."""


@dataclass(frozen=True)
class FileDigest:
    """One file of a model: its path relative to the folder (POSIX separators), size and SHA-256 (hex)."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelDigest:
    """The model-signing root digest of a folder (hex) and its files in the order that digest uses."""

    root: str
    files: tuple[FileDigest, ...]

    @property
    def short(self) -> str:
        """First 12 hex characters: enough to tell versions apart in logs and headers."""
        return self.root[:12]


def digest_folder(folder: Path, *, workers: int | None = None, ignore: Iterable[str] = ()) -> ModelDigest:
    """Hash every regular file under ``folder`` and return the model-signing root digest.

    ``ignore`` holds paths relative to ``folder`` (POSIX separators) to leave out; a directory covers
    everything under it. Nothing else is left out. Raises ``UnsafeModelFolder`` for a symlink, a
    non-regular file, an ignore path outside the folder, a file name that is not valid UTF-8, a file that
    changes while being hashed, or a folder with no files to hash.
    """
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    ignored = _ignore_parts(ignore)
    folder = Path(folder)
    try:
        root_fd = os.open(folder, _DIR_FLAGS)
    except OSError as exc:
        if folder.is_symlink():
            raise UnsafeModelFolder(f"model folder {folder} is a symlink; pass the real folder") from exc
        raise UnsafeModelFolder(f"cannot open model folder {folder}: {exc.strerror}") from exc
    try:
        found: list[tuple[_Parts, int]] = []
        _walk(root_fd, folder, (), ignored, found)
        if not found:
            raise UnsafeModelFolder(f"model folder {folder} holds no files to hash")
        # Largest first keeps the pool busy to the end when one big weights file dominates.
        found.sort(key=lambda item: item[1], reverse=True)
        with ThreadPoolExecutor(max_workers=min(workers, len(found)), thread_name_prefix="digest") as pool:
            futures = [pool.submit(_hash_file, root_fd, folder, parts) for parts, _ in found]
            try:
                hashed = [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        os.close(root_fd)
    hashed.sort(key=lambda item: item[0])
    root = hashlib.sha256(b"".join(raw for _, raw, _ in hashed)).hexdigest()
    files = tuple(FileDigest(path="/".join(parts), size=size, sha256=raw.hex()) for parts, raw, size in hashed)
    return ModelDigest(root=root, files=files)


def _ignore_parts(ignore: Iterable[str]) -> tuple[_Parts, ...]:
    """Normalise ignore entries to path parts; refuse ones that could reach outside the folder."""
    if isinstance(ignore, str):
        raise TypeError("ignore takes an iterable of paths, not a single string")
    result = []
    for entry in ignore:
        path = PurePosixPath(entry)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise UnsafeModelFolder(f"ignore path {entry!r} must be relative to the model folder, without '..'")
        result.append(path.parts)
    return tuple(result)


def _is_ignored(parts: _Parts, ignored: tuple[_Parts, ...]) -> bool:
    return any(parts[: len(prefix)] == prefix for prefix in ignored)


def _walk(
    dir_fd: int, folder: Path, prefix: _Parts, ignored: tuple[_Parts, ...], found: list[tuple[_Parts, int]]
) -> None:
    """Collect (parts, size) of regular files below ``dir_fd``; refuse anything else."""
    with os.scandir(dir_fd) as entries:
        listed = list(entries)
    for entry in listed:
        parts = (*prefix, entry.name)
        shown = folder.joinpath(*parts)
        if _is_ignored(parts, ignored):
            continue
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            raise UnsafeModelFolder(f"{shown!s} has a name that is not valid UTF-8") from None
        if entry.is_symlink():
            raise UnsafeModelFolder(
                f"{shown} is a symlink; model folders must hold real files "
                "(copy with `cp -rL`, or download with --local-dir)"
            )
        if entry.is_dir(follow_symlinks=False):
            child_fd = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                _walk(child_fd, folder, parts, ignored, found)
            finally:
                os.close(child_fd)
        elif entry.is_file(follow_symlinks=False):
            found.append((parts, entry.stat(follow_symlinks=False).st_size))
        else:
            raise UnsafeModelFolder(f"{shown} is not a regular file or directory")


def _open_beneath(root_fd: int, folder: Path, parts: _Parts) -> int:
    """Open ``parts`` below ``root_fd`` without following a symlink at any step."""
    dir_fd = root_fd
    try:
        for name in parts[:-1]:
            next_fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            if dir_fd != root_fd:
                os.close(dir_fd)
            dir_fd = next_fd
        return os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise UnsafeModelFolder(
            f"cannot open {folder.joinpath(*parts)} safely (changed during the walk?): {exc.strerror}"
        ) from exc
    finally:
        if dir_fd != root_fd:
            os.close(dir_fd)


_buffers = threading.local()


def _buffer() -> memoryview:
    """One reusable read buffer per worker thread: no 8 MiB allocation per file."""
    view = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(_CHUNK))
    return view


def _hash_file(root_fd: int, folder: Path, parts: _Parts) -> tuple[_Parts, bytes, int]:
    """SHA-256 of one file read in large chunks; hashlib and readinto release the GIL, so threads scale."""
    fd = _open_beneath(root_fd, folder, parts)
    with open(fd, "rb", buffering=0) as handle:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise UnsafeModelFolder(f"{folder.joinpath(*parts)} is not a regular file")
        view = _buffer()
        hasher = hashlib.sha256()
        size = 0
        while n := handle.readinto(view):
            hasher.update(view[:n])
            size += n
        after = os.fstat(fd)
    if size != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise UnsafeModelFolder(f"{folder.joinpath(*parts)} changed while it was being hashed")
    return parts, hasher.digest(), size
