"""The watermark vocabulary shared by keys, requests, the processor and the detector (no torch here).

Applied schemes (what one response carries; `_wm.s`, the `X-Watermark` header, the detector's tests):
  1 kgw-lefthash, 2 kgw-selfhash  KGW on every position (distorts greedy and sampled answers alike)
  3 gumbel                        sampled requests: Gumbel-max inside vLLM's sampler, on the final
                                  distribution the request asked for (distortion-free)
  4 kgw-gated                     greedy requests: selfhash KGW only where the model is unsure (top
                                  probability below `gate`), biasing only near-ties (within delta)
Numbers 1..3 mirror `kernels.watermark_params.Scheme` (a test checks it); kgw-gated runs as a selfhash
row with the gate set (`KGW_GATED_KERNEL_SCHEME`). They are repeated here so that the modules the server
imports at start do not pull in torch.

Configured schemes (a key's `scheme`): `auto` (the default) and its synonym `gumbel` choose per request,
gumbel for sampled requests and kgw-gated for greedy ones; `kgw-selfhash` and `kgw-lefthash` apply that
KGW to every request (the older behaviour, which changes greedy answers: docs/watermark.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

KGW_LEFTHASH = 1
KGW_SELFHASH = 2
GUMBEL = 3
KGW_GATED = 4
KGW_GATED_KERNEL_SCHEME = KGW_SELFHASH  # the kernel's scheme (hash and colours) of a kgw-gated row

SCHEME_IDS: dict[str, int] = {
    "kgw-lefthash": KGW_LEFTHASH,
    "kgw-selfhash": KGW_SELFHASH,
    "gumbel": GUMBEL,
    "kgw-gated": KGW_GATED,
}
SCHEME_NAMES: dict[int, str] = {v: k for k, v in SCHEME_IDS.items()}
CONFIGURED_SCHEMES = ("auto", "gumbel", "kgw-selfhash", "kgw-lefthash")
DEFAULT_WIDTH: dict[int, int] = {KGW_LEFTHASH: 1, KGW_SELFHASH: 4, GUMBEL: 4, KGW_GATED: 4}
MAX_WIDTH = 8  # kernels.watermark_params.W_MAX
KEY_BYTES = 16  # 128-bit keys, the kernel's key size

# vLLM treats temperatures below this as greedy (vllm.sampling_params._SAMPLING_EPS).
GREEDY_EPSILON = 1e-5


@dataclass(frozen=True)
class KeyMaterial:
    """One watermark key with the parameters it was created with.

    `scheme` is the configured scheme name (`CONFIGURED_SCHEMES`); the scheme a given response carries
    follows from it and the request's temperature (`applied_scheme`). `gamma`/`delta` are KGW's; `gate`
    is kgw-gated's confidence gate (greedy positions whose top probability is below it are marked) and
    `warmup` the number of leading answer tokens kgw-gated never biases. `key` is secret: it is excluded
    from repr and comparisons so it never reaches a log line or a traceback by accident.
    """

    key_id: str
    scheme: str
    gamma: float
    delta: float
    width: int
    key: bytes = field(repr=False, compare=False)
    status: str = "active"
    org_id: str | None = None
    gate: float = 0.0
    warmup: int = 0

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError("watermark keys are exactly 16 bytes")
        if self.scheme not in CONFIGURED_SCHEMES:
            raise ValueError(f"unknown watermark scheme {self.scheme!r}")


def applied_scheme(configured: str, temperature: float) -> int:
    """The scheme a response under a key configured with `configured` carries at `temperature`.

    Gumbel-max needs randomness to hide a signal in: greedy requests get kgw-gated instead.
    """
    if configured in ("gumbel", "auto"):
        return GUMBEL if temperature >= GREEDY_EPSILON else KGW_GATED
    return SCHEME_IDS[configured]


def possible_schemes(configured: str) -> tuple[int, ...]:
    """Every scheme a text generated under a key configured with `configured` may carry (detection)."""
    if configured in ("gumbel", "auto"):
        return (GUMBEL, KGW_GATED)
    return (SCHEME_IDS[configured],)


def effective_width(scheme: int, width: int) -> int:
    """The configured width, or the scheme's default for 0."""
    return width or DEFAULT_WIDTH[scheme]
