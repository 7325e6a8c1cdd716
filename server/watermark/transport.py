"""Sealed key handles: how a request's watermark key reaches vLLM's worker processes.

The key has to travel with the request (in `SamplingParams.extra_args`) from the server process to the
engine-core and worker processes that vLLM spawns. `SamplingParams.__repr__` prints `extra_args`, and
vLLM logs the scheduler's view of every running request, sampling params included, at ERROR level when
the engine core fails (`vllm.logging_utils.dump_input`). A raw key in `extra_args` would end up in the
logs the first time the engine crashed. So the request carries a *handle*: the key sealed with
AES-256-GCM under a transport key that exists only in this server's process tree.

The transport key is 256 random bits created once per server process tree and exported in the
environment variable `SMS_WATERMARK_TRANSPORT_KEY` before the engine starts, so the processes vLLM
spawns inherit it (they are our own processes and could read our memory anyway). It is never written
to disk, never in a config, and a restart makes handles in old logs useless. The associated data binds
a handle to its key id and every watermark parameter, so a handle cannot be replayed with a weaker delta
or another scheme: whatever reaches the engine was minted by this server, or fails validation.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import MutableMapping

from server.identity.secrets import SecretBox

ENV_VAR = "SMS_WATERMARK_TRANSPORT_KEY"
_KEY_BYTES = 32


class TransportKeyMissing(RuntimeError):
    """The engine process has no transport key: the server did not prepare watermarking before the engine."""


class KeySealer:
    """Seals and opens key handles under the transport key (AES-256-GCM, random nonce)."""

    def __init__(self, transport_key: bytes) -> None:
        if len(transport_key) != _KEY_BYTES:
            raise ValueError("the transport key must be 32 bytes")
        self._box = SecretBox(transport_key)

    def __repr__(self) -> str:
        return "KeySealer(<transport key>)"

    def seal(self, key: bytes, aad: str) -> str:
        return self._box.encrypt(key, "wm-handle/" + aad)

    def open(self, handle: str, aad: str) -> bytes:
        """The key inside `handle`; ValueError if it was not sealed by this process tree for `aad`."""
        try:
            return self._box.decrypt(handle, "wm-handle/" + aad)
        except Exception:  # InvalidTag, bad base64, short blob: all the same to a caller
            raise ValueError("the watermark key handle is invalid") from None


_cache: dict[str, KeySealer] = {}


def _decode(value: str) -> bytes:
    raw = base64.urlsafe_b64decode(value.encode())
    if len(raw) != _KEY_BYTES:
        raise TransportKeyMissing(f"{ENV_VAR} does not hold a 32-byte key")
    return raw


def install_transport_key(environ: MutableMapping[str, str] | None = None) -> KeySealer:
    """The process tree's sealer, creating and exporting the transport key if there is none yet.

    Call before the engine spawns its processes (`watermark_processors()` does). Idempotent.
    """
    env = os.environ if environ is None else environ
    if ENV_VAR not in env:
        env[ENV_VAR] = base64.urlsafe_b64encode(secrets.token_bytes(_KEY_BYTES)).decode()
    return current_sealer(env)


def current_sealer(environ: MutableMapping[str, str] | None = None) -> KeySealer:
    """The sealer for the transport key in the environment; TransportKeyMissing if there is none.

    Engine processes call this: a worker without the key refuses to start rather than serve requests
    it cannot watermark.
    """
    env = os.environ if environ is None else environ
    value = env.get(ENV_VAR)
    if not value:
        raise TransportKeyMissing(
            f"{ENV_VAR} is not set in this process; the server must call watermark_processors() (or "
            "install_transport_key()) before building the engine"
        )
    sealer = _cache.get(value)
    if sealer is None:
        sealer = _cache[value] = KeySealer(_decode(value))
    return sealer
