"""The per-request watermark parameters: the `_wm` entry of `SamplingParams.extra_args`, and the header.

Format (version 2), set by the server after admission and never taken from a client:

    extra_args["_wm"] = {
        "v":  2,               format version
        "s":  4,               scheme applied to this request: 1 kgw-lefthash, 2 kgw-selfhash, 3 gumbel,
                               4 kgw-gated (`types`)
        "id": "wk_0123456789ab",  key id (public; it is in the response header)
        "k":  "v1.…",          the 16-byte key sealed under the transport key (see `transport`)
        "g":  0.25,            gamma (green-list fraction, KGW)
        "d":  2.0,             delta (logit bias, KGW; kgw-gated: also the near-tie window)
        "w":  4,               context width, 1..8, resolved (never 0)
        "t":  1.0,             the request's sampling temperature (must match the request's; 3 needs > 0)
        "q":  0.2,             kgw-gated's confidence gate (0 for the other schemes)
        "a":  0,               kgw-gated's warm-up: leading answer tokens never biased
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
    KGW_GATED,
    KGW_SELFHASH,
    MAX_WIDTH,
    SCHEME_NAMES,
    KeyMaterial,
    applied_scheme,
    effective_width,
)

EXTRA_ARGS_KEY = "_wm"
HEADER = "X-Watermark"
FORMAT_VERSION = 2
KEY_ID_PATTERN = re.compile(r"wk_[0-9a-f]{12}")
_FIELDS = frozenset({"v", "s", "id", "k", "g", "d", "w", "t", "q", "a"})
MAX_WARMUP = 256

# Why a response carries no watermark; the header says `off; reason=<reason>`.
OFF_EXEMPT = "exempt"  # the API key is exempted (an audited admin decision)
OFF_DISABLED = "disabled"  # `[watermark] enabled = false`
OFF_ENGINE = "engine"  # the engine does not apply watermarks (the fake test engine)
OFF_REASONS = (OFF_EXEMPT, OFF_DISABLED, OFF_ENGINE)
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
    gate: float = 0.0
    warmup: int = 0


def _aad(entry: Mapping[str, Any]) -> str:
    """Every field but the handle, in a fixed order: what the sealed key is bound to."""
    return "|".join(f"{name}={entry[name]!r}" for name in ("v", "id", "s", "g", "d", "w", "t", "q", "a"))


def request_scheme(material: KeyMaterial, temperature: float) -> int:
    """The scheme one request under `material` at `temperature` carries. A kgw-gated key row made without
    a gate (before gating existed) applies plain kgw-selfhash, and says so."""
    scheme = applied_scheme(material.scheme, temperature)
    return KGW_SELFHASH if scheme == KGW_GATED and not material.gate else scheme


def watermark_extra_args(material: KeyMaterial, temperature: float, sealer: KeySealer | None = None) -> dict[str, Any]:
    """The `extra_args` entries that watermark one request under `material` at `temperature`."""
    scheme = request_scheme(material, temperature)
    gated = scheme == KGW_GATED
    entry: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "id": material.key_id,
        "s": scheme,
        "g": float(material.gamma),
        "d": float(material.delta),
        "w": effective_width(scheme, material.width),
        "t": float(temperature),
        "q": float(material.gate) if gated else 0.0,
        "a": int(material.warmup) if gated else 0,
    }
    entry["k"] = (sealer or install_transport_key()).seal(material.key, _aad(entry))
    return {EXTRA_ARGS_KEY: entry}


def header_value(material: KeyMaterial | None, temperature: float | None = None, *, off: str = OFF_EXEMPT) -> str:
    """`X-Watermark` value: `<scheme>; key-id=<id>` (never key material), or `off; reason=<why>`.

    With `temperature`, the scheme is the one this response carries (auto keys: gumbel for sampled
    requests, kgw-gated for greedy ones); without it, the key's configured scheme.
    """
    if material is None:
        if off not in OFF_REASONS:
            raise ValueError(f"unknown reason {off!r} for an unmarked response")
        return f"off; reason={off}"
    name = material.scheme if temperature is None else SCHEME_NAMES[request_scheme(material, temperature)]
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
    width, gate, warmup = _integer(entry, "w"), _number(entry, "q"), _integer(entry, "a")
    if scheme == KGW_GATED:
        if not 0.0 < gate <= 1.0 or not 0 <= warmup <= MAX_WARMUP:
            raise ValueError(f"_wm.q must lie in (0, 1] and _wm.a in 0..{MAX_WARMUP} for kgw-gated")
    elif gate != 0.0 or warmup != 0:
        raise ValueError("_wm.q and _wm.a are kgw-gated's and must be 0 for other schemes")
    if not 0.0 < gamma < 1.0:
        raise ValueError("_wm.g must lie strictly between 0 and 1")
    if not 0.0 < delta <= 50.0:
        raise ValueError("_wm.d must lie in (0, 50]")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"_wm.w must lie in 1..{MAX_WIDTH}")
    if temperature < 0.0 or (scheme == GUMBEL and temperature < GREEDY_EPSILON):
        raise ValueError("_wm.t must be >= 0, and > 0 for Gumbel")
    sealer = sealer or current_sealer()
    key = sealer.open(handle, _aad(entry))
    if len(key) != KEY_BYTES:
        raise ValueError("the watermark key handle is invalid")
    return WatermarkArgs(scheme, key_id, key, gamma, delta, width, temperature, gate, warmup)
