"""The per-request watermark parameters: the `_wm` entry of `SamplingParams.extra_args`, and the header.

Format (version 1), set by the server after admission and never taken from a client:

    extra_args["_wm"] = {
        "v":  1,               format version
        "s":  2,               scheme applied to this request: 1 kgw-lefthash, 2 kgw-selfhash, 3 gumbel
        "id": "wk_0123456789ab",  key id (public; it is in the response header)
        "k":  "v1.…",          the 16-byte key sealed under the transport key (see `transport`)
        "g":  0.25,            gamma (green-list fraction, KGW)
        "d":  2.0,             delta (logit bias, KGW)
        "w":  4,               context width, 1..8, resolved (never 0)
        "t":  1.0,             the request's sampling temperature (Gumbel divides by it)
    }

The handle's associated data covers every other field, so changing any of them (say delta to 0, which
would switch the watermark off) makes the handle fail to open and the engine refuse the request.
`parse_wm` is the one validator, used by the vLLM adapter's `validate_params` at admission and by the
processor when a request joins the batch. The protocol layer refuses `extra_args` (and anything named
like a watermark) from clients, so the only writer of `_wm` is `watermark_extra_args`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.watermark.transport import KeySealer, current_sealer, install_transport_key
from server.watermark.types import (
    GREEDY_EPSILON,
    GUMBEL,
    KEY_BYTES,
    MAX_WIDTH,
    SCHEME_NAMES,
    KeyMaterial,
    applied_scheme,
    effective_width,
)

EXTRA_ARGS_KEY = "_wm"
HEADER = "X-Watermark"
HEADER_OFF = "off"  # the header value for a response of an exempt key
FORMAT_VERSION = 1
KEY_ID_PATTERN = re.compile(r"wk_[0-9a-f]{12}")
_FIELDS = frozenset({"v", "s", "id", "k", "g", "d", "w", "t"})
_MAX_HANDLE_CHARS = 256


@dataclass(frozen=True)
class WatermarkArgs:
    """A validated `_wm` entry with its key opened. The key is kept out of repr."""

    scheme: int
    key_id: str
    key: bytes = field(repr=False)
    gamma: float
    delta: float
    width: int
    temperature: float


def _aad(key_id: str, scheme: int, gamma: float, delta: float, width: int, temperature: float) -> str:
    return f"v{FORMAT_VERSION}|{key_id}|{scheme}|{gamma!r}|{delta!r}|{width}|{temperature!r}"


def watermark_extra_args(material: KeyMaterial, temperature: float, sealer: KeySealer | None = None) -> dict[str, Any]:
    """The `extra_args` entries that watermark one request under `material` at `temperature`."""
    scheme = applied_scheme(material.scheme, temperature)
    width = effective_width(scheme, material.width)
    gamma, delta, temperature = float(material.gamma), float(material.delta), float(temperature)
    sealer = sealer or install_transport_key()
    handle = sealer.seal(material.key, _aad(material.key_id, scheme, gamma, delta, width, temperature))
    entry = {"v": FORMAT_VERSION, "s": scheme, "id": material.key_id, "k": handle}
    entry.update({"g": gamma, "d": delta, "w": width, "t": temperature})
    return {EXTRA_ARGS_KEY: entry}


def header_value(material: KeyMaterial | None, temperature: float | None = None) -> str:
    """`X-Watermark` value: `<scheme>; key-id=<id>` (never key material), or `off` for exempt keys.

    With `temperature`, the scheme is the one this response carries (gumbel/auto keys fall back to
    kgw-selfhash for greedy requests); without it, the key's configured scheme.
    """
    if material is None:
        return HEADER_OFF
    name = material.scheme if temperature is None else SCHEME_NAMES[applied_scheme(material.scheme, temperature)]
    return f"{name}; key-id={material.key_id}"


def _number(entry: Mapping[str, Any], name: str) -> float:
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"_wm.{name} must be a finite number")
    return float(value)


def _integer(entry: Mapping[str, Any], name: str) -> int:
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"_wm.{name} must be an integer")
    return value


def parse_wm(extra_args: Mapping[str, Any] | None, sealer: KeySealer | None = None) -> WatermarkArgs | None:
    """The request's watermark, None if it has none; ValueError for anything malformed or forged."""
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return None
    entry = extra_args[EXTRA_ARGS_KEY]
    if not isinstance(entry, Mapping) or set(entry) != _FIELDS:
        raise ValueError(f"_wm must be an object with exactly the fields {sorted(_FIELDS)}")
    if _integer(entry, "v") != FORMAT_VERSION:
        raise ValueError("unsupported _wm format version")
    scheme = _integer(entry, "s")
    if scheme not in SCHEME_NAMES:
        raise ValueError("_wm.s is not a watermark scheme")
    key_id, handle = entry["id"], entry["k"]
    if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
        raise ValueError("_wm.id is not a watermark key id")
    if not isinstance(handle, str) or len(handle) > _MAX_HANDLE_CHARS:
        raise ValueError("_wm.k is not a key handle")
    gamma, delta, temperature = _number(entry, "g"), _number(entry, "d"), _number(entry, "t")
    width = _integer(entry, "w")
    if not 0.0 < gamma < 1.0:
        raise ValueError("_wm.g must lie strictly between 0 and 1")
    if not 0.0 < delta <= 50.0:
        raise ValueError("_wm.d must lie in (0, 50]")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"_wm.w must lie in 1..{MAX_WIDTH}")
    if temperature < 0.0 or (scheme == GUMBEL and temperature < GREEDY_EPSILON):
        raise ValueError("_wm.t must be >= 0, and > 0 for Gumbel")
    sealer = sealer or current_sealer()
    key = sealer.open(handle, _aad(key_id, scheme, gamma, delta, width, temperature))
    if len(key) != KEY_BYTES:
        raise ValueError("the watermark key handle is invalid")
    return WatermarkArgs(scheme, key_id, key, gamma, delta, width, temperature)
