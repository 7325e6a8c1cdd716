"""The server's master secret and what is derived from it: the API-key pepper and encryption at rest.

One master secret (configured, or generated once per data directory in development) yields independent
subkeys through HKDF-SHA256 with distinct labels, so the pepper and the key-encryption key never share
bytes. `SecretBox` encrypts small secrets (TOTP seeds, JWT private keys, watermark keys) with AES-256-GCM;
the associated data binds each ciphertext to what it is for (e.g. the user id), so ciphertexts cannot be
swapped between rows.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server.settings import Settings

MIN_SECRET_BYTES = 32
_PLACEHOLDERS = {"changeme", "change-me", "secret", "please-change", "placeholder"}


class InsecureSecret(RuntimeError):
    """The configured master secret is missing, too short or a placeholder."""


def load_master_secret(settings: Settings) -> bytes:
    configured = settings.auth.secret_key.get_secret_value() if settings.auth.secret_key else None
    if configured is not None:
        raw = configured.encode()
        if len(raw) < MIN_SECRET_BYTES or configured.strip().lower() in _PLACEHOLDERS:
            raise InsecureSecret(
                f"auth.secret_key must be at least {MIN_SECRET_BYTES} random bytes and not a "
                "placeholder; generate one with `openssl rand -base64 48`."
            )
        return raw
    if settings.environment == "production":
        raise InsecureSecret(
            "auth.secret_key (SERVER_AUTH__SECRET_KEY) is required in production; generate "
            "one with `openssl rand -base64 48`."
        )
    return _development_secret(settings.data_dir / "secret.key")


def _development_secret(path: Path) -> bytes:
    """Read or create a per-data-directory secret file, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        data = path.read_bytes().strip()
        if len(data) < MIN_SECRET_BYTES:
            raise InsecureSecret(f"{path} is shorter than {MIN_SECRET_BYTES} bytes; delete it to regenerate") from None
        return data
    value = base64.urlsafe_b64encode(secrets.token_bytes(48))
    with os.fdopen(fd, "wb") as f:
        f.write(value + b"\n")
    return value


def derive_key(master: bytes, label: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label.encode()).derive(master)


class Keyring:
    """Subkeys of the master secret, each for one purpose."""

    def __init__(self, master: bytes) -> None:
        self.pepper = derive_key(master, "api-key-pepper/v1")
        self.box = SecretBox(derive_key(master, "key-encryption-key/v1"))

    def mac(self, value: str) -> str:
        """HMAC-SHA256 under the pepper (API keys, recovery codes): a fast, keyed, non-reversible lookup key."""
        return hmac.new(self.pepper, value.encode(), hashlib.sha256).hexdigest()


class SecretBox:
    """AES-256-GCM with a random 96-bit nonce; output is `v1.<base64url(nonce || ciphertext)>`."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: bytes, aad: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, plaintext, aad.encode())
        return "v1." + base64.urlsafe_b64encode(nonce + sealed).decode()

    def decrypt(self, token: str, aad: str) -> bytes:
        if not token.startswith("v1."):
            raise ValueError("unknown ciphertext version")
        blob = base64.urlsafe_b64decode(token[3:].encode())
        return self._aead.decrypt(blob[:12], blob[12:], aad.encode())
