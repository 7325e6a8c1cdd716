"""Watermark detection with exact tail probabilities and a family-wise error bound.

For every candidate key and every scheme a text under that key may carry (`possible_schemes`), the
text's tokens are scored at the positions generation could have watermarked:

  * positions with a full context inside the text (the first `width` tokens' contexts lay in a prompt
    we do not see);
  * the first occurrence of each context only: generation leaves a repeated context untouched
    (`ContextTracker`), so scoring it again would only dilute;
  * each distinct hash input once. Under H0 (the text was not generated with this key) the colour, or
    the uniform u, of a position is a keyed hash of that input, so scored positions are independent
    only if their inputs differ. For lefthash and Gumbel the input is (context, token); for selfhash it
    is (minimum keyed hash over the window and the token, token), which repeats across different
    contexts whenever a frequent token holds the window minimum (about 1 time in width + 1).

KGW: g green among n scored, each green with probability p0 = floor(gamma * 2**32) / 2**32 under H0,
so p = P(Binomial(n, p0) >= g) = `binom.sf(g - 1, n, p0)`; z = (g - p0 n) / sqrt(n p0 (1 - p0)).
Gumbel: S = sum of -log(1 - u) over scored positions with u the emitted token's uniform; each term is
Exp(1) under H0 (up to u's 2**-24 grid, which only shortens the tail), so p = P(Gamma(n, 1) >= S)
= `gamma.sf(S, n)`; z = (S - n) / sqrt(n).

kgw-gated (greedy answers): generation biased only positions where the model was unsure (top
probability below the key's `gate`) and had a near-tie (another token within `delta` of the top), and
never the first `warmup` tokens. The detector scores the same positions, recomputing each position's top
two log-probabilities with the model (`confidences`: the serving engine scores the text after a neutral
chat prefix, `server.watermark.confidence`). That selection depends on the text alone, never on the key,
so under H0 the colours of the selected positions are still independent Bernoulli(p0) and the binomial
test stays exact; where the recomputed confidences differ from generation's (the detector does not see
the prompt) the test only loses power. Without confidences (the command line has no model) kgw-gated is
scored on every position, which is just as valid and weaker.

Multiple testing: the reported p-value is Bonferroni-adjusted, min(1, m p) over the m (key, scheme)
tests tried, so the probability that an unwatermarked text is flagged under any of them is at most the
threshold. The result carries aggregates only, never per-token scores (those would show an attacker
exactly which tokens to edit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kernels import watermark_hash as H
from kernels.watermark import gumbel_u, kgw_green
from kernels.watermark_params import Scheme
from server.watermark.types import (
    KGW_GATED,
    KGW_GATED_KERNEL_SCHEME,
    SCHEME_NAMES,
    KeyMaterial,
    effective_width,
    possible_schemes,
)

DEFAULT_THRESHOLD = 1e-4
DEFAULT_MIN_TOKENS = 16


@dataclass(frozen=True)
class DetectionResult:
    detected: bool
    scheme: str | None  # the scheme and key of the best test when detected, else None
    key_id: str | None
    p_value: float  # Bonferroni-adjusted, of the best test
    z: float
    tokens_scored: int
    green_fraction: float | None  # KGW only
    reason: str | None = None  # why nothing could be tested (too few tokens, no keys)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["reason"] is None:
            del out["reason"]
        return out


@dataclass(frozen=True)
class _Test:
    scheme: int
    key_id: str
    p: float
    z: float
    n: int
    green_fraction: float | None


# One position's model confidence: its top log-probabilities, highest first (at least two), or None.
Confidence = Sequence[float] | None


def scored_positions(
    token_ids: Sequence[int],
    key: bytes,
    scheme: int,
    width: int,
    selected: Callable[[int], bool] | None = None,
) -> list[int]:
    """Indices of the tokens a detector scores (see the module docstring), in order. `selected(t)`, when
    given, keeps only some first-occurrence positions (kgw-gated's gate), before hash inputs are deduplicated."""
    contexts: set[tuple[int, ...]] = set()
    inputs: set[tuple[int, int]] = set()
    kh = H.murmur3_words([*H.key_words(key), 2]) if scheme == Scheme.KGW_SELFHASH else 0
    hashed: dict[int, int] = {}
    keep = []
    for t in range(width, len(token_ids)):
        ctx = tuple(token_ids[t - width : t])
        if ctx in contexts:
            continue
        contexts.add(ctx)
        if selected is not None and not selected(t):
            continue
        token = token_ids[t]
        if scheme == Scheme.KGW_SELFHASH:  # other schemes: a new context is a new hash input
            for tok in (*ctx, token):
                if tok not in hashed:
                    hashed[tok] = H.fmix32(kh ^ H.token_mix(tok))
            anchor = min(hashed[tok] for tok in (*ctx, token))
            if (anchor, token) in inputs:
                continue
            inputs.add((anchor, token))
        keep.append(t)
    return keep


def kgw_p_value(green: int, n: int, p0: float) -> float:
    """P(Binomial(n, p0) >= green), exact."""
    from scipy import stats  # type: ignore[import-untyped]

    return float(stats.binom.sf(green - 1, n, p0))


def gumbel_p_value(score: float, n: int) -> float:
    """P(Gamma(n, 1) >= score): the sum of n independent Exp(1) terms."""
    from scipy import stats

    return float(stats.gamma.sf(score, n))


def gate_selector(material: KeyMaterial, confidences: Sequence[Confidence] | None) -> Callable[[int], bool] | None:
    """kgw-gated's positions for `material`: past the warm-up, the model unsure (top probability below the
    gate) with a near-tie (the second log-probability within delta of the first). None scores every
    position (no confidences, or a key made without a gate)."""
    if confidences is None or not material.gate:
        return None
    log_gate, delta, warmup = math.log(material.gate), material.delta, material.warmup

    def selected(t: int) -> bool:
        conf = confidences[t] if t < len(confidences) else None
        return t >= warmup and conf is not None and conf[0] < log_gate and conf[1] >= conf[0] - delta

    return selected


def _test(
    token_ids: Sequence[int],
    material: KeyMaterial,
    scheme: int,
    min_tokens: int,
    confidences: Sequence[Confidence] | None,
) -> _Test:
    width = effective_width(scheme, material.width)
    selected = gate_selector(material, confidences) if scheme == KGW_GATED else None
    hashed = KGW_GATED_KERNEL_SCHEME if scheme == KGW_GATED else scheme
    keep = scored_positions(token_ids, material.key, hashed, width, selected)
    n = len(keep)
    if n < min_tokens:
        return _Test(scheme, material.key_id, 1.0, 0.0, n, None)
    contexts = [token_ids[t - width : t] for t in keep]
    candidates = torch.tensor([token_ids[t] for t in keep], dtype=torch.int64)
    if scheme == Scheme.GUMBEL:
        u = gumbel_u(material.key, contexts, candidates).double()
        score = float(-torch.log1p(-u).sum())
        return _Test(scheme, material.key_id, gumbel_p_value(score, n), (score - n) / math.sqrt(n), n, None)
    green = int(kgw_green(material.key, contexts, candidates, Scheme(hashed), material.gamma).sum())
    p0 = H.gamma_threshold(material.gamma) / 2.0**32
    z = (green - p0 * n) / math.sqrt(n * p0 * (1.0 - p0))
    return _Test(scheme, material.key_id, kgw_p_value(green, n, p0), z, n, green / n)


def detect(
    token_ids: Sequence[int],
    candidates: Sequence[KeyMaterial],
    vocab_size: int | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    confidences: Sequence[Confidence] | None = None,
) -> DetectionResult:
    """Test `token_ids` against every candidate key; `detected` iff the adjusted p-value < `threshold`.
    `confidences[t]`: the model's top log-probabilities at position t (kgw-gated's gate), if known."""
    ids = [int(t) for t in token_ids]
    limit = vocab_size if vocab_size is not None else 1 << 31
    if any(t < 0 or t >= limit for t in ids):
        raise ValueError(f"token ids must lie in [0, {limit})")
    if confidences is not None and len(confidences) != len(ids):
        raise ValueError("confidences must hold one entry per token")
    tests = [_test(ids, m, s, min_tokens, confidences) for m in candidates for s in possible_schemes(m.scheme)]
    if not tests:
        return DetectionResult(False, None, None, 1.0, 0.0, 0, None, reason="no_keys")
    informative = [t for t in tests if t.n >= min_tokens]
    if not informative:
        most = max(t.n for t in tests)
        return DetectionResult(False, None, None, 1.0, 0.0, most, None, reason="too_few_tokens")
    best = min(informative, key=lambda t: (t.p, -t.z))  # first on ties: the caller's own, active keys
    adjusted = min(1.0, best.p * len(tests))
    detected = adjusted < threshold
    return DetectionResult(
        detected=detected,
        scheme=SCHEME_NAMES[best.scheme] if detected else None,
        key_id=best.key_id if detected else None,
        p_value=adjusted,
        z=best.z,
        tokens_scored=best.n,
        green_fraction=best.green_fraction,
    )
