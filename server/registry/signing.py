"""Signing and verifying model folders in the OpenSSF model-signing format, offline, with pinned keys.

Signatures are model-signing 1.1.1 bundles (a DSSE envelope over an in-toto statement whose subject is the
root digest over every file's SHA-256), made with a local elliptic-curve key or a certificate chain. Nothing
is ignored when hashing: not ``.git*`` files (model-signing's default), not the signature, which must live
outside the folder (the blob store keeps it in ``meta/<digest>/``).

Verification fails closed, with a reason, and is stricter than ``model_signing.verifying.Config``:

- the bundle must name its signer (a public-key hint or a certificate chain) and that signer must be pinned:
  a key whose fingerprint is in the pinned list, or a chain to a pinned CA certificate. The hint only picks
  the key; model-signing then checks the ECDSA signature over the DSSE envelope with it;
- the payload must be model-signing's v1.0 predicate with file serialization, SHA-256, symlinks off, and
  relative resource names without ``..``; the statement's root digest must match its resources;
- the folder is hashed by ``digest_folder`` (no symlinks or special files, ``O_NOFOLLOW`` at every step) and
  compared file by file: missing, extra, renamed, swapped or modified files are each named;
- the folder's metadata (inode, size, mtime, ctime of every file and directory) is recorded before hashing and
  checked after, and ``VerifiedManifest.assert_unchanged()`` lets the loader check it again after the engine
  has read the files: any write, chmod, rename or added file in between changes a ctime or mtime.

Fingerprints are model-signing's key hint: SHA-256 of the public key's SubjectPublicKeyInfo PEM.
Detached signatures over other bytes (the AI-BOM) use the same key: ECDSA over DSSE's pre-authentication
encoding of (payload type, bytes), stored as a small JSON envelope (``sign_bytes``/``verify_bytes``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from server.registry.digest import FileDigest, UnsafeModelFolder, digest_folder

__all__ = [
    "Signer",
    "Trust",
    "VerificationFailed",
    "VerifiedManifest",
    "ensure_signing_key",
    "generate_signing_key",
    "private_key_fingerprint",
    "public_key_fingerprint",
    "sign_bytes",
    "sign_folder",
    "verify_bytes",
    "verify_folder",
]

MAX_SIGNATURE_BYTES = 64 * 1024 * 1024
_PREDICATE_V1 = "https://model_signing/signature/v1.0"
_STATEMENT = "https://in-toto.io/Statement/v1"
_Snapshot = tuple[tuple[str, int, int, int, int], ...]


class VerificationFailed(Exception):
    """A model or document did not verify; ``reason`` says exactly why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Signer:
    """The local key that signs imports: an EC private key, optionally with its certificate and chain."""

    private_key: Path
    certificate: Path | None = None
    certificate_chain: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Trust:
    """Who may sign what we load: pinned signer public keys (PEM) and pinned CA certificates for chains."""

    public_keys: tuple[Path, ...] = ()
    certificates: tuple[Path, ...] = ()


@dataclass(frozen=True)
class VerifiedManifest:
    """A folder that matched its signature: root digest, files, signer fingerprint and a metadata snapshot."""

    folder: Path
    root: str
    files: tuple[FileDigest, ...]
    signer: str
    signer_public_key: bytes = field(repr=False)
    snapshot: _Snapshot = field(repr=False)

    def assert_unchanged(self) -> None:
        """Raise ``VerificationFailed`` if anything in the folder changed since it was verified."""
        now = _snapshot(self.folder)
        if now != self.snapshot:
            changed = sorted({e[0] for e in set(now) ^ set(self.snapshot)})
            raise VerificationFailed(f"model folder {self.folder} changed after verification: {', '.join(changed)}")


def generate_signing_key(private_key_path: Path) -> Path:
    """Write a new EC P-256 private key (PEM, 0600, never overwriting) and its public key beside it (``.pub``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_key_path = Path(private_key_path)
    private_key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path = private_key_path.with_suffix(".pub")
    public_path.write_bytes(_public_pem(key.public_key()))
    return public_path


def ensure_signing_key(private_key_path: Path) -> tuple[Path, bool]:
    """The public key path for ``private_key_path``, generating the pair if absent; ``True`` when generated."""
    private_key_path = Path(private_key_path)
    if private_key_path.exists():
        public_path = private_key_path.with_suffix(".pub")
        if not public_path.exists():
            public_path.write_bytes(_public_pem(_load_private(private_key_path).public_key()))
        return public_path, False
    return generate_signing_key(private_key_path), True


def private_key_fingerprint(private_key_path: Path) -> str:
    """The fingerprint of the public half of a local private key (what verification reports as the signer)."""
    return hashlib.sha256(_public_pem(_load_private(private_key_path).public_key())).hexdigest()


def public_key_fingerprint(public_key: Path | bytes) -> str:
    """SHA-256 of a public key's SubjectPublicKeyInfo PEM: model-signing's key hint."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key if isinstance(public_key, bytes) else Path(public_key).read_bytes()
    return hashlib.sha256(_public_pem(serialization.load_pem_public_key(pem))).hexdigest()


def sign_folder(
    folder: Path,
    private_key_path: Path,
    signature_path: Path,
    *,
    certificate: Path | None = None,
    certificate_chain: Sequence[Path] = (),
    expected_root: str | None = None,
) -> str:
    """Sign every file in ``folder`` into ``signature_path`` (outside it); return the signed root digest.

    With ``expected_root`` (the digest the store computed) the signature is only kept if it covers exactly
    those bytes, so the stored folder, its address and its signature can never disagree.
    """
    from model_signing import hashing, signing

    folder, signature_path = Path(folder).resolve(), Path(signature_path)
    if signature_path.resolve().is_relative_to(folder):
        raise ValueError(f"signature {signature_path} must be stored outside the model folder {folder}")
    hashing_config = (
        hashing.Config()
        .set_ignored_paths(paths=[], ignore_git_paths=False)
        .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
    )
    config = signing.Config().set_hashing_config(hashing_config)
    if certificate is not None:
        config.use_certificate_signer(
            private_key=private_key_path, signing_certificate=certificate, certificate_chain=list(certificate_chain)
        )
    else:
        config.use_elliptic_key_signer(private_key=private_key_path)
    signature_path.parent.mkdir(parents=True, exist_ok=True)
    partial = signature_path.with_name(f"{signature_path.name}.partial-{os.getpid()}")
    try:
        config.sign(folder, partial)
        root = json.loads(_read_bundle(partial)[1])["subject"][0]["digest"]["sha256"]
        if expected_root is not None and root != expected_root:
            raise VerificationFailed(f"{folder} hashed to {root} when signed, not {expected_root}: it changed")
        os.replace(partial, signature_path)
    finally:
        partial.unlink(missing_ok=True)
    return root


def verify_folder(
    folder: Path,
    signature_path: Path,
    pinned_public_keys: Sequence[Path],
    *,
    pinned_certificates: Sequence[Path] = (),
    workers: int | None = None,
) -> VerifiedManifest:
    """Verify ``folder`` against ``signature_path`` with only pinned signers; raise ``VerificationFailed``."""
    folder = Path(folder)
    bundle, payload_bytes = _read_bundle(Path(signature_path))
    signer, signer_pem = _check_signer(bundle, pinned_public_keys, pinned_certificates)
    try:
        payload = json.loads(payload_bytes)
    except ValueError as exc:
        raise VerificationFailed(f"signature payload is not JSON: {exc}") from None
    signed, signed_root = _signed_files(payload)
    try:
        if stat.S_ISLNK(os.lstat(folder).st_mode):
            raise VerificationFailed(f"model folder {folder} is a symlink")
        before = _snapshot(folder)
        actual = digest_folder(folder, workers=workers)
    except UnsafeModelFolder as exc:
        raise VerificationFailed(f"model folder refused: {exc}") from None
    except FileNotFoundError:
        raise VerificationFailed(f"model folder {folder} does not exist") from None
    if _snapshot(folder) != before:
        raise VerificationFailed(f"model folder {folder} changed while it was being verified")
    problems = _compare(signed, {f.path: f.sha256 for f in actual.files})
    if problems or actual.root != signed_root:
        raise VerificationFailed(
            f"model does not match its signature (signed root {signed_root[:16]}, folder {actual.root[:16]}): "
            + "; ".join(problems or ["root digest differs"])
        )
    return VerifiedManifest(folder, actual.root, actual.files, signer, signer_pem, before)


def sign_bytes(data: bytes, private_key_path: Path, payload_type: str) -> bytes:
    """A detached signature envelope over ``data``: ECDSA over DSSE's PAE(payload_type, data), as JSON."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = _load_private(private_key_path)
    signature = key.sign(_pae(payload_type, data), ec.ECDSA(hashes.SHA256()))
    envelope = {
        "payloadType": payload_type,
        "payloadSha256": hashlib.sha256(data).hexdigest(),
        "keyid": hashlib.sha256(_public_pem(key.public_key())).hexdigest(),
        "sig": base64.b64encode(signature).decode("ascii"),
    }
    return json.dumps(envelope, indent=2).encode("utf-8") + b"\n"


def verify_bytes(data: bytes, envelope: bytes, pinned_public_keys: Sequence[Path | bytes], payload_type: str) -> str:
    """Check a ``sign_bytes`` envelope with pinned keys only; return the signer fingerprint."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        parsed = json.loads(envelope)
        keyid, signature = parsed["keyid"], base64.b64decode(parsed["sig"], validate=True)
        declared_type = parsed["payloadType"]
    except (ValueError, KeyError, TypeError) as exc:
        raise VerificationFailed(f"detached signature is corrupt or truncated: {exc}") from None
    if declared_type != payload_type:
        raise VerificationFailed(f"detached signature is for {declared_type!r}, not {payload_type!r}")
    pinned = {public_key_fingerprint(k): k for k in pinned_public_keys}
    if keyid not in pinned:
        raise VerificationFailed(f"detached signature is by key {keyid[:16]}, which is not pinned")
    key = pinned[keyid]
    public_key = serialization.load_pem_public_key(key if isinstance(key, bytes) else Path(key).read_bytes())
    try:
        public_key.verify(signature, _pae(payload_type, data), ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
    except InvalidSignature:
        raise VerificationFailed("detached signature does not match the document: it was altered") from None
    return keyid


def _pae(payload_type: str, data: bytes) -> bytes:
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(data), data)


def _public_pem(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_private(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an elliptic-curve private key")
    return key


def _read_bundle(path: Path) -> tuple[dict[str, Any], bytes]:
    """Read a signature file (a regular file, not a symlink, bounded): the bundle dict and its DSSE payload."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise VerificationFailed(f"no signature at {path}: the model is unsigned") from None
    except OSError as exc:
        raise VerificationFailed(f"cannot open signature {path} safely (a symlink?): {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise VerificationFailed(f"signature {path} is not a regular file")
        raw = handle.read(MAX_SIGNATURE_BYTES + 1)
    try:
        if len(raw) > MAX_SIGNATURE_BYTES:
            raise ValueError("larger than the signature size limit")
        bundle = json.loads(raw)
        payload = base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True)
        bundle["verificationMaterial"].setdefault("tlogEntries", [])  # what model-signing's reader also fills in
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise VerificationFailed(f"signature {path} is corrupt or truncated: {type(exc).__name__}: {exc}") from None
    return bundle, payload


def _check_signer(
    bundle: dict[str, Any], pinned_keys: Sequence[Path], pinned_certificates: Sequence[Path]
) -> tuple[str, bytes]:
    """Verify the bundle's DSSE signature with a pinned signer; return (signer fingerprint, signer key PEM)."""
    from model_signing._signing import sign_certificate, sign_ec_key, sign_sigstore_pb
    from sigstore_models.bundle import v1 as bundle_pb

    material = bundle["verificationMaterial"]
    chain = (material.get("x509CertificateChain") or {}).get("certificates") or []
    if chain:
        if not pinned_certificates:
            raise VerificationFailed("signature uses a certificate chain, but no CA certificate is pinned")
        verifier: Any = sign_certificate.Verifier([Path(c) for c in pinned_certificates])
        signer_pem = _public_pem(_leaf_certificate(chain[0]["rawBytes"]).public_key())
    else:
        hint = (material.get("publicKey") or {}).get("hint")
        if not hint:
            raise VerificationFailed("signature names no signer key (no public-key hint): refusing to guess")
        if not pinned_keys:
            raise VerificationFailed("no signer public keys are pinned: no signature can be trusted")
        pinned = {public_key_fingerprint(k): Path(k) for k in pinned_keys}
        if hint not in pinned:
            raise VerificationFailed(f"signed by key {hint[:16]}, which is not pinned; refusing an unknown signer")
        verifier = sign_ec_key.Verifier(pinned[hint])
        signer_pem = pinned[hint].read_bytes()
    try:
        verifier.verify(sign_sigstore_pb.Signature(bundle_pb.Bundle.from_dict(bundle)))
    except Exception as exc:  # InvalidSignature, OpenSSL chain errors, pydantic errors: all mean "not verified"
        detail = f"{type(exc).__name__}: {exc}".rstrip(": ")
        raise VerificationFailed(
            f"signature does not verify with the pinned signer ({detail}): the signed statement was altered, "
            "or another key made it"
        ) from None
    return hashlib.sha256(_public_pem(_load_public(signer_pem))).hexdigest(), signer_pem


def _leaf_certificate(raw_b64: str) -> Any:
    from cryptography import x509

    return x509.load_der_x509_certificate(base64.b64decode(raw_b64))


def _load_public(pem: bytes) -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_public_key(pem)


def _signed_files(payload: dict[str, Any]) -> tuple[dict[str, str], str]:
    """The signed {path: sha256} map and root digest, after checking the statement has the shape we sign."""
    if payload.get("_type") != _STATEMENT or payload.get("predicateType") != _PREDICATE_V1:
        raise VerificationFailed(f"signature payload is not a model-signing v1.0 statement ({payload.get('_type')})")
    serialization = payload["predicate"]["serialization"]
    if (serialization.get("method"), serialization.get("hash_type"), serialization.get("allow_symlinks")) != (
        "files",
        "sha256",
        False,
    ):
        raise VerificationFailed(f"signature uses serialization {serialization}; only per-file SHA-256 is accepted")
    signed: dict[str, str] = {}
    for resource in payload["predicate"]["resources"]:
        name = resource["name"]
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name or name in signed:
            raise VerificationFailed(f"signature names a path outside the model folder or twice: {name!r}")
        signed[name] = resource["digest"]
    root = hashlib.sha256(b"".join(bytes.fromhex(d) for d in signed.values())).hexdigest()
    if root != payload["subject"][0]["digest"]["sha256"]:
        raise VerificationFailed("signature payload is inconsistent: its root digest does not match its files")
    return signed, root


def _compare(signed: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Name every difference: renamed and swapped files first, then missing, extra and modified ones."""
    missing, extra = set(signed) - set(actual), set(actual) - set(signed)
    changed = {n for n in set(signed) & set(actual) if signed[n] != actual[n]}
    problems = []
    for old in sorted(missing):
        new = next((e for e in sorted(extra) if actual[e] == signed[old]), None)
        if new is not None:
            problems.append(f"renamed: {old} -> {new}")
            missing.discard(old)
            extra.discard(new)
    for a in sorted(changed):
        b = next((b for b in sorted(changed) if b != a and actual[a] == signed[b] and actual[b] == signed[a]), None)
        if a in changed and b is not None:
            problems.append(f"swapped: {a} <-> {b}")
            changed -= {a, b}
    problems += [f"missing: {n}" for n in sorted(missing)]
    problems += [f"not covered by the signature: {n}" for n in sorted(extra)]
    problems += [f"modified: {n}" for n in sorted(changed)]
    return problems


def _snapshot(folder: Path) -> _Snapshot:
    """(path, inode, size, mtime, ctime) of the folder and everything below it, without following symlinks."""
    st = os.lstat(folder)
    entries = [(".", st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)]
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in [*dirs, *files]:
            path = Path(root, name)
            st = os.lstat(path)
            entries.append((path.relative_to(folder).as_posix(), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(sorted(entries))
