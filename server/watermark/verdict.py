"""What `POST /v1/watermark/detect` tells a caller: a verdict, and nothing a forger could learn from.

The detector's result holds exact aggregates (p-value, z, tokens scored, green fraction). Answered as
they are, they make the endpoint an oracle: a fixed prefix plus one candidate token shows that token's
colour in the change of the green count (a tester forged a "watermarked" text in 139 queries that way).
So the answer is:

    detected:      {"detected": true, "scheme": …, "key_id": …, "p_value_below": <band>}
    not detected:  {"detected": false}  or  {"detected": false, "reason": "too_few_tokens" | "no_keys"}

* No counts, fractions, z or p-value below the threshold: the answer for every undetected text of enough
  length is the same four words.
* `p_value_below` is the smallest of a few fixed bands (threshold, threshold², threshold⁴, threshold⁸:
  1e-4, 1e-8, 1e-16, 1e-32 by default) that the adjusted p-value lies under. Every band edge is a boundary
  a prober could stand on, so there are few of them, far apart (a one-token edit moves log10 p by half a
  decade to a decade; the bands are 4 to 16 decades wide).
* `reason: too_few_tokens` is decided from the text alone (its distinct context windows at each tried key's
  width), not from the detector's scored count, which for selfhash depends on the key (positions sharing
  a window minimum are scored once) and so would leak key bits at the length boundary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from server.watermark.types import KeyMaterial, effective_width, possible_schemes

if TYPE_CHECKING:
    from server.watermark.detector import DetectionResult

BANDS = 4


def p_value_bands(threshold: float) -> list[float]:
    """threshold, threshold², threshold⁴, …, rounded to two significant digits."""
    return [float(f"{10 ** (math.log10(threshold) * 2**i):.1e}") for i in range(BANDS)]


def p_value_band(p_value: float, threshold: float) -> float:
    """The smallest band edge the p-value lies under (the threshold itself for any detection)."""
    edges = p_value_bands(threshold)
    return min((e for e in edges if p_value < e), default=edges[0])


def distinct_windows(token_ids: Sequence[int], width: int) -> int:
    """Positions with a full context of `width` tokens whose context is new: an upper bound, computed
    without any key, on what a detector of that width scores."""
    seen: set[tuple[int, ...]] = set()
    for t in range(width, len(token_ids)):
        seen.add(tuple(token_ids[t - width : t]))
    return len(seen)


def long_enough(token_ids: Sequence[int], candidates: Sequence[KeyMaterial], min_tokens: int) -> bool:
    """Whether some (key, scheme) to try could score `min_tokens` positions of this text."""
    widths = {effective_width(s, m.width) for m in candidates for s in possible_schemes(m.scheme)}
    return any(distinct_windows(token_ids, w) >= min_tokens for w in widths)


def public_verdict(
    result: DetectionResult,
    token_ids: Sequence[int],
    candidates: Sequence[KeyMaterial],
    *,
    threshold: float,
    min_tokens: int,
) -> dict[str, Any]:
    """The caller's answer, built from the detector's result (see the module docstring)."""
    if result.detected:
        return {
            "detected": True,
            "scheme": result.scheme,
            "key_id": result.key_id,
            "p_value_below": p_value_band(result.p_value, threshold),
        }
    if not candidates:
        return {"detected": False, "reason": "no_keys"}
    if not long_enough(token_ids, candidates, min_tokens):
        return {"detected": False, "reason": "too_few_tokens"}
    return {"detected": False}
