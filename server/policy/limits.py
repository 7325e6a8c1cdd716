"""Rate-limit values: what one scope (a key, a user, an org) may use, and the role defaults.

A `Limits` is a plain value. Which scopes apply to a request and how their limits are combined is
decided elsewhere (`scopes.py`); the store enforces every scope it is given, so "the tightest applies"
falls out of checking all of them atomically rather than from merging numbers up front.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

# The key's `limits` JSON uses these short names; the long names are the dataclass fields.
_SHORT_NAMES = {
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "tpd": "tokens_per_day",
    "concurrent": "concurrent",
}
SHORT_NAMES = tuple(_SHORT_NAMES)  # "rpm", "tpm", "tpd", "concurrent"


def _min(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _max(a: int | None, b: int | None) -> int | None:
    if a is None or b is None:
        return None
    return max(a, b)


@dataclass(frozen=True)
class Limits:
    """Limits of one scope. None means unlimited; 0 means "nothing is allowed" (a disabled dimension).

    requests_per_minute and tokens_per_minute hold over ANY 60 s window (sliding log, not fixed buckets);
    tokens_per_day is per calendar UTC day; concurrent counts requests admitted and not yet settled.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    concurrent: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{f.name} must be a non-negative integer or None, got {value!r}")

    @classmethod
    def unlimited(cls) -> Limits:
        return cls()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Limits:
        """Parse a key's `limits` JSON: `{"rpm", "tpm", "tpd", "concurrent"}`, each a non-negative int or null.

        Unknown names are refused rather than ignored: a typo such as "tmp" would otherwise silently leave
        a key unlimited. Missing names mean "no limit at this scope" (the user and org scopes still apply).
        """
        if not data:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError("limits must be an object")
        unknown = sorted(set(data) - set(_SHORT_NAMES))
        if unknown:
            raise ValueError(f"unknown limit name(s) {unknown}; allowed: {sorted(_SHORT_NAMES)}")
        return cls(**{_SHORT_NAMES[name]: value for name, value in data.items()})

    def to_dict(self) -> dict[str, int | None]:
        return {short: getattr(self, long) for short, long in _SHORT_NAMES.items()}

    def tightest(self, other: Limits) -> Limits:
        """Per dimension, the smaller limit (None loses to any number)."""
        return Limits(
            *(_min(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)),
        )

    def loosest(self, other: Limits) -> Limits:
        """Per dimension, the larger limit (None wins): how a user with several roles gets their defaults."""
        return Limits(
            *(_max(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)),
        )

    def scaled(self, factor: float) -> Limits:
        """Every finite limit times `factor` in (0, 1], floored, never below 1 (adaptive throttling).

        The floor of 1 keeps a throttled caller able to make progress instead of turning a risk signal
        into a silent ban; 0 stays 0 (an explicitly disabled dimension) and None stays None.
        """
        if not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {factor}")

        def scale(value: int | None) -> int | None:
            if value is None or value == 0:
                return value
            return max(1, math.floor(value * factor))

        return Limits(*(scale(getattr(self, f.name)) for f in fields(self)))

    @property
    def is_unlimited(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


# Role defaults apply to the USER scope (all of a user's keys together). A key's own `limits` can only
# tighten them, an org's limits cap all its users. Admins get room for bulk work but are still finite:
# an unlimited default would let one leaked admin key monopolise every GPU.
DEFAULT_LIMITS: dict[str, Limits] = {
    "owner": Limits(requests_per_minute=600, tokens_per_minute=2_000_000, tokens_per_day=50_000_000, concurrent=64),
    "admin": Limits(requests_per_minute=600, tokens_per_minute=2_000_000, tokens_per_day=50_000_000, concurrent=64),
    "operator": Limits(requests_per_minute=300, tokens_per_minute=500_000, tokens_per_day=10_000_000, concurrent=32),
    "developer": Limits(requests_per_minute=120, tokens_per_minute=120_000, tokens_per_day=2_000_000, concurrent=16),
    # Auditors read logs and call detection; inference is a side use.
    "auditor": Limits(requests_per_minute=30, tokens_per_minute=30_000, tokens_per_day=200_000, concurrent=4),
    "client": Limits(requests_per_minute=60, tokens_per_minute=60_000, tokens_per_day=1_000_000, concurrent=8),
}

# Custom roles (created at runtime) and callers without roles get the least generous built-in default.
FALLBACK_ROLE = "client"


def role_limits(roles: Iterable[str], defaults: Mapping[str, Limits] | None = None) -> Limits:
    """The user-scope default for a set of roles: the loosest of their defaults (roles add capability)."""
    table = DEFAULT_LIMITS if defaults is None else defaults
    known = [table[role] for role in roles if role in table]
    if not known:
        return table[FALLBACK_ROLE]
    result = known[0]
    for limits in known[1:]:
        result = result.loosest(limits)
    return result
