"""The watermark vocabulary shared by keys, requests, the processor and the detector (no torch here).

Scheme numbers mirror `kernels.watermark_params.Scheme` (a test checks it); they are repeated here so
that the modules the server imports at start do not pull in torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KGW_LEFTHASH = 1
KGW_SELFHASH = 2
GUMBEL = 3

SCHEME_IDS: dict[str, int] = {"kgw-lefthash": KGW_LEFTHASH, "kgw-selfhash": KGW_SELFHASH, "gumbel": GUMBEL}
SCHEME_NAMES: dict[int, str] = {v: k for k, v in SCHEME_IDS.items()}
DEFAULT_WIDTH: dict[int, int] = {KGW_LEFTHASH: 1, KGW_SELFHASH: 4, GUMBEL: 4}
MAX_WIDTH = 8  # kernels.watermark_params.W_MAX
KEY_BYTES = 16  # 128-bit keys, the kernel's key size

# vLLM treats temperatures below this as greedy (vllm.sampling_params._SAMPLING_EPS).
GREEDY_EPSILON = 1e-5


@dataclass(frozen=True)
class KeyMaterial:
    """One watermark key with the parameters it was created with.

    `scheme` is the configured scheme name (`kgw-selfhash`, `kgw-lefthash`, `gumbel` or `auto`); the
    scheme a given response carries follows from it and the request's temperature (`applied_scheme`).
    `key` is secret: it is excluded from repr and comparisons so it never reaches a log line or a
    traceback by accident.
    """

    key_id: str
    scheme: str
    gamma: float
    delta: float
    width: int
    key: bytes = field(repr=False, compare=False)
    status: str = "active"
    org_id: str | None = None

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError("watermark keys are exactly 16 bytes")
        if self.scheme not in (*SCHEME_IDS, "auto"):
            raise ValueError(f"unknown watermark scheme {self.scheme!r}")


def applied_scheme(configured: str, temperature: float) -> int:
    """The scheme a response under a key configured with `configured` carries at `temperature`.

    Gumbel-max needs randomness to hide a signal in: greedy requests fall back to KGW selfhash.
    """
    if configured in ("gumbel", "auto"):
        return GUMBEL if temperature >= GREEDY_EPSILON else KGW_SELFHASH
    return SCHEME_IDS[configured]


def possible_schemes(configured: str) -> tuple[int, ...]:
    """Every scheme a text generated under a key configured with `configured` may carry (detection)."""
    if configured in ("gumbel", "auto"):
        return (GUMBEL, KGW_SELFHASH)
    return (SCHEME_IDS[configured],)


def effective_width(scheme: int, width: int) -> int:
    """The configured width, or the scheme's default for 0."""
    return width or DEFAULT_WIDTH[scheme]
