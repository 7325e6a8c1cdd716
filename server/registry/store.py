"""Content-addressed, read-only blob store for model versions, under ``<data_dir>/registry/``.

Layout::

    registry/blobs/sha256/<digest>/   one model folder per root digest; files 0444, directories 0555
    registry/meta/<digest>/           signature.sig, bom.json, bom.sig (0444; replaced whole when re-signed)
    registry/tmp/                     private staging (0700) on the same filesystem, so a move is one rename

Why this shape:

- The address is the OpenSSF model-signing root digest of the folder, so a version, its folder, its
  signature and its BOM all name the same bytes, identical imports share one folder, and a stored folder
  whose bytes no longer hash to its address is visibly wrong (``verify`` refuses it).
- An import copies the source into private staging first (never following a symlink: every directory and
  file is opened relative to its parent with ``O_NOFOLLOW``; symlinks and special files are refused), checks
  the format policy and computes the digest *of the copy*. What is stored, signed and later served is
  therefore exactly what was checked and hashed; a source folder changed mid-import cannot slip other bytes
  in. The copy is made read-only and moved into place with one ``rename``: a folder under ``blobs/`` is
  always complete, and nothing in the store is ever modified afterwards.
- The engine loads the stored folder itself, after ``verify`` re-hashed it against its signature with the
  pinned keys; ``VerifiedManifest.assert_unchanged()`` after loading closes the window between the check
  and the engine's reads (read-only modes stop accidents and other users; a ctime check catches the rest).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from server.registry.digest import FileDigest, UnsafeModelFolder, digest_folder
from server.registry.format_policy import enforce_folder
from server.registry.signing import Signer, Trust, VerificationFailed, VerifiedManifest, sign_folder, verify_folder

__all__ = ["META_FILES", "BlobStore", "StoredVersion", "copy_tree"]

META_FILES = frozenset({"signature.sig", "bom.json", "bom.sig"})
_DIGEST = re.compile(r"[0-9a-f]{64}")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class StoredVersion:
    """A folder in the store: its root digest, path, files, total size, and whether this import created it."""

    digest: str
    path: Path
    files: tuple[FileDigest, ...]
    size_bytes: int
    created: bool


class BlobStore:
    """The registry's blobs and their signatures and BOMs, under ``<data_dir>/registry``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / "registry"

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    def path_for(self, digest: str) -> Path:
        """The stored folder for ``digest`` (which must be 64 lowercase hex characters)."""
        return self.blobs_dir / _checked(digest)

    def meta_dir(self, digest: str) -> Path:
        return self.root / "meta" / _checked(digest)

    def signature_path(self, digest: str) -> Path:
        return self.meta_dir(digest) / "signature.sig"

    def has(self, digest: str) -> bool:
        return self.path_for(digest).is_dir()

    def import_folder(self, src: Path, *, policy: bool = True) -> StoredVersion:
        """Copy ``src`` into the store (refusing symlinks), check the policy, and file it under its digest.

        Raises ``UnsafeModelFolder`` for a symlink or special file and ``FormatRefused`` when the policy
        refuses the folder; nothing is left behind in either case.
        """
        with self.staging("import-") as staging:
            copy = staging / "model"
            copy_tree(Path(src), copy)
            if policy:
                enforce_folder(copy)
            digest = digest_folder(copy)
            target, created = self.path_for(digest.root), False
            if not target.is_dir():
                _make_read_only(copy)
                try:
                    os.rename(copy, target)
                    created = True
                except OSError:
                    if not target.is_dir():  # not a concurrent import of the same bytes that won the race
                        raise
                os.chmod(target, 0o555)  # noqa: S103 - read-only; the data dir mode limits who reaches it
            size = sum(f.size for f in digest.files)
            return StoredVersion(digest=digest.root, path=target, files=digest.files, size_bytes=size, created=created)

    @contextmanager
    def staging(self, prefix: str) -> Iterator[Path]:
        """A fresh private (0700) folder under ``tmp/``, removed on exit whatever happened.

        It is on the blobs' filesystem, so a finished folder moves into ``blobs/`` with one rename.
        """
        for folder in (self.blobs_dir, self.tmp_dir, self.root / "meta"):
            folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))
        try:
            yield staging
        finally:
            _remove(staging)

    def sign(self, digest: str, signer: Signer) -> Path:
        """Sign the stored folder into ``meta/<digest>/signature.sig``; refused unless it still hashes to ``digest``."""
        signature = self.signature_path(digest)
        signature.parent.mkdir(parents=True, exist_ok=True)
        sign_folder(
            self.path_for(digest),
            signer.private_key,
            signature,
            certificate=signer.certificate,
            certificate_chain=signer.certificate_chain,
            expected_root=digest,
        )
        os.chmod(signature, 0o444)
        return signature

    def write_meta(self, digest: str, name: str, data: bytes) -> Path:
        """Write ``meta/<digest>/<name>`` whole (temporary file, then rename), read-only."""
        if name not in META_FILES:
            raise ValueError(f"unknown registry metadata file {name!r}")
        target = self.meta_dir(digest) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{name}.partial-{os.getpid()}")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o444)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def read_meta(self, digest: str, name: str) -> bytes:
        if name not in META_FILES:
            raise ValueError(f"unknown registry metadata file {name!r}")
        fd = os.open(self.meta_dir(digest) / name, _FILE_FLAGS)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def verify(self, digest: str, trust: Trust, *, path: Path | None = None) -> VerifiedManifest:
        """Re-hash the stored folder (or ``path``) against the version's signature with pinned signers only.

        This is the load-time check: the engine then loads ``manifest.folder`` and calls
        ``manifest.assert_unchanged()`` once it has read the weights.
        """
        folder = self.path_for(digest) if path is None else Path(path)
        manifest = verify_folder(
            folder, self.signature_path(digest), trust.public_keys, pinned_certificates=trust.certificates
        )
        if manifest.root != digest:
            raise VerificationFailed(f"{folder} verified as {manifest.root[:16]}, not version digest {digest[:16]}")
        return manifest


def _checked(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
    return digest


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a directory tree, opening every entry relative to its parent without following symlinks.

    Raises ``UnsafeModelFolder`` for a symlink or special file anywhere in the tree.
    """
    try:
        fd = os.open(src, _DIR_FLAGS)
    except OSError as exc:
        kind = "a symlink" if src.is_symlink() else "not a readable directory"
        raise UnsafeModelFolder(f"model folder {src} is {kind}: {exc.strerror}") from None
    try:
        _copy_dir(fd, src, dst)
    finally:
        os.close(fd)


def _copy_dir(dir_fd: int, shown: Path, dst: Path) -> None:
    dst.mkdir(mode=0o700)
    with os.scandir(dir_fd) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        if entry.is_symlink():
            raise UnsafeModelFolder(f"{shown / entry.name} is a symlink; model folders must hold real files")
        if entry.is_dir(follow_symlinks=False):
            child = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                _copy_dir(child, shown / entry.name, dst / entry.name)
            finally:
                os.close(child)
        elif entry.is_file(follow_symlinks=False):
            _copy_file(dir_fd, entry.name, shown / entry.name, dst / entry.name)
        else:
            raise UnsafeModelFolder(f"{shown / entry.name} is not a regular file or directory")


def _copy_file(dir_fd: int, name: str, shown: Path, dst: Path) -> None:
    try:
        src_fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise UnsafeModelFolder(f"cannot open {shown} safely (changed during the copy?): {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(src_fd).st_mode):
            raise UnsafeModelFolder(f"{shown} is not a regular file")
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:  # in-kernel copy (and reflinks where the filesystem has them)
                while os.copy_file_range(src_fd, dst_fd, 1 << 30):
                    pass
            except OSError:  # filesystems without copy_file_range: continue from the current offsets
                with open(src_fd, "rb", closefd=False) as reader, open(dst_fd, "wb", closefd=False) as writer:
                    shutil.copyfileobj(reader, writer, 16 * 1024 * 1024)
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def _make_read_only(folder: Path) -> None:
    """Files 0444 and directories 0555 below ``folder``; ``folder`` itself stays writable until it is moved."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            os.chmod(Path(root, name), 0o444, follow_symlinks=False)
        for name in dirs:
            os.chmod(Path(root, name), 0o555, follow_symlinks=False)  # noqa: S103 - read-only by design


def _remove(folder: Path) -> None:
    """Remove staging, first making its directories writable again (a failed move leaves them 0555)."""
    if not folder.exists():
        return
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            os.chmod(Path(root, name), 0o700, follow_symlinks=False)
    shutil.rmtree(folder, ignore_errors=True)
