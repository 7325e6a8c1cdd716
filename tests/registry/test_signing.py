"""Signing round trips: our digest equals model-signing's, the model-signing CLI agrees, certificates work."""

from __future__ import annotations

import datetime
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from server.registry.digest import digest_folder
from server.registry.signing import (
    VerificationFailed,
    ensure_signing_key,
    generate_signing_key,
    private_key_fingerprint,
    public_key_fingerprint,
    sign_bytes,
    sign_folder,
    verify_bytes,
    verify_folder,
)


def test_generated_key_is_private_and_never_overwritten(tmp_path) -> None:
    public = generate_signing_key(tmp_path / "k.pem")
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    assert public_key_fingerprint(public) == private_key_fingerprint(tmp_path / "k.pem")
    with pytest.raises(FileExistsError):
        generate_signing_key(tmp_path / "k.pem")
    assert ensure_signing_key(tmp_path / "k.pem") == (public, False)
    assert ensure_signing_key(tmp_path / "new.pem")[1] is True


def test_round_trip_names_our_digest_and_signer(model, keys, tmp_path) -> None:
    signature = tmp_path / "model.sig"
    root = sign_folder(model, keys["pinned"], signature, expected_root=digest_folder(model).root)
    manifest = verify_folder(model, signature, [keys["other_pub"], keys["pinned_pub"]])
    assert manifest.root == root == digest_folder(model).root
    assert manifest.signer == public_key_fingerprint(keys["pinned_pub"])


def test_signature_inside_the_folder_is_refused(model, keys) -> None:
    with pytest.raises(ValueError, match="outside the model folder"):
        sign_folder(model, keys["pinned"], model / "model.sig")


def test_signing_refuses_bytes_other_than_expected(model, keys, tmp_path) -> None:
    with pytest.raises(VerificationFailed, match="it changed"):
        sign_folder(model, keys["pinned"], tmp_path / "model.sig", expected_root="0" * 64)
    assert not (tmp_path / "model.sig").exists()


def test_model_signing_cli_verifies_our_signature(model, keys, tmp_path) -> None:
    """Interoperability: the upstream CLI accepts what we sign (it must not ignore git paths either)."""
    signature = tmp_path / "model.sig"
    sign_folder(model, keys["pinned"], signature)
    cli = Path(sys.executable).with_name("model_signing")
    args = [str(cli), "verify", "key", str(model), "--signature", str(signature), "--public_key"]
    ok = subprocess.run([*args, str(keys["pinned_pub"])], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run([*args, str(keys["other_pub"])], capture_output=True, text=True, check=False)
    assert bad.returncode != 0


def test_no_pinned_keys_trusts_nothing(model, keys, tmp_path) -> None:
    sign_folder(model, keys["pinned"], tmp_path / "model.sig")
    with pytest.raises(VerificationFailed, match="no signer public keys are pinned"):
        verify_folder(model, tmp_path / "model.sig", [])


def test_detached_signature(keys) -> None:
    envelope = sign_bytes(b"document", keys["pinned"], "text/plain")
    assert verify_bytes(b"document", envelope, [keys["pinned_pub"]], "text/plain") == private_key_fingerprint(
        keys["pinned"]
    )
    with pytest.raises(VerificationFailed, match="altered"):
        verify_bytes(b"documenT", envelope, [keys["pinned_pub"]], "text/plain")
    with pytest.raises(VerificationFailed, match="not pinned"):
        verify_bytes(b"document", envelope, [keys["other_pub"]], "text/plain")
    with pytest.raises(VerificationFailed, match="corrupt or truncated"):
        verify_bytes(b"document", envelope[:40], [keys["pinned_pub"]], "text/plain")
    with pytest.raises(VerificationFailed, match="not 'application/json'"):
        verify_bytes(b"document", envelope, [keys["pinned_pub"]], "application/json")


def _certificate_chain(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a leaf signed by it (code signing), written as PEM: (ca, leaf certificate, leaf key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])

    def build(subject, key, issuer_key, *, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False), critical=True)
        )
        return builder.sign(issuer_key, hashes.SHA256())

    ca = build(ca_name, ca_key, ca_key, ca=True)
    leaf = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), leaf_key, ca_key, ca=False)
    paths = folder / f"{name}-ca.pem", folder / f"{name}-leaf.pem", folder / f"{name}-leaf.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(paths[2], os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, key_pem)
    os.close(fd)
    return paths


def test_certificate_chain_to_a_pinned_ca(model, tmp_path) -> None:
    ca, leaf, leaf_key = _certificate_chain(tmp_path, "publisher")
    other_ca, _, _ = _certificate_chain(tmp_path, "stranger")
    signature = tmp_path / "model.sig"
    sign_folder(model, leaf_key, signature, certificate=leaf, certificate_chain=[ca])
    manifest = verify_folder(model, signature, [], pinned_certificates=[ca])
    assert manifest.signer == private_key_fingerprint(leaf_key)
    with pytest.raises(VerificationFailed, match="does not verify with the pinned signer"):
        verify_folder(model, signature, [], pinned_certificates=[other_ca])
    with pytest.raises(VerificationFailed, match="no CA certificate is pinned"):
        verify_folder(model, signature, [])
