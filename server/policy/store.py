"""The limit-store interface: atomic admission over several scopes, settlement, and read-back.

Accounting model (identical in every backend; the contract suite in tests/policy checks both):

* A request is admitted with a reservation of `tokens` (prompt + n * max_tokens). In ONE atomic step,
  for every scope: 1 request and `tokens` go into the scope's 60 s sliding log, `tokens` into its UTC-day
  counter, and the request takes a concurrency slot with a lease. If any scope would exceed any limit,
  nothing is recorded anywhere (no partial reservations to leak).
* `settle` lowers the reservation to the tokens actually used (never raises it) in every scope it was
  recorded in, and frees the slot. The log entry keeps its admission timestamp.
* Exactness: an entry at time s counts for the window (t - 60, t] for every t in [s, s + 60). Admission
  checks the window ending now, and timestamps only move forward, so for EVERY 60 s window the sum of
  reservations (hence of settled usage, which is never larger) is at most the limit. There is no
  bucket boundary to burst across and no race between replicas, because the check and the write are
  one atomic step.
* Leases: a slot not settled within `lease_seconds` (a crashed replica) is reclaimed automatically; its
  tokens stay counted (conservative). A settle after the lease still refunds unused tokens while the
  reservation record exists (lease + window + 60 s).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

from server.policy.errors import RateLimited, retry_after_header
from server.policy.limits import Limits

LimitName = Literal["requests_per_minute", "tokens_per_minute", "tokens_per_day", "concurrent"]
LIMIT_NAMES: tuple[LimitName, ...] = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "concurrent")

WINDOW_SECONDS = 60.0
DAY_SECONDS = 86_400
DEFAULT_LEASE_SECONDS = 600.0


@dataclass(frozen=True)
class Scope:
    """One accounting bucket a request is charged to, e.g. "key:abc", "user:u1", "org:o1"."""

    name: str
    limits: Limits


@dataclass(frozen=True)
class ScopeState:
    """A scope's counters as seen by an admission (after it, when admitted)."""

    name: str
    limits: Limits
    requests: int  # in the sliding window
    tokens: int  # reserved/settled in the sliding window
    tokens_today: int
    in_flight: int
    window_reset: float  # seconds until the window is empty again (newest entry + window - now)


@dataclass(frozen=True)
class Failure:
    """One limit that the reservation does not fit. retry_after None: unknown (concurrency) or never."""

    scope_index: int
    limit: LimitName
    retry_after: float | None
    never_fits: bool = False


@dataclass(frozen=True)
class Decision:
    """The outcome of `admit`, with what the response headers need (x-ratelimit-*, Retry-After)."""

    allowed: bool
    request_id: str
    tokens: int
    limit: LimitName | None = None
    scope: str | None = None
    retry_after: float | None = None
    never_fits: bool = False
    message: str = ""
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None
    states: tuple[ScopeState, ...] = field(default=(), repr=False)

    def headers(self) -> dict[str, str]:
        """OpenAI-style rate-limit headers for the tightest scope, plus Retry-After on a refusal."""
        out: dict[str, str] = {}
        for kind, limit, remaining, reset in (
            ("requests", self.limit_requests, self.remaining_requests, self.reset_requests),
            ("tokens", self.limit_tokens, self.remaining_tokens, self.reset_tokens),
        ):
            if limit is None:
                continue
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, remaining or 0))
            out[f"x-ratelimit-reset-{kind}"] = f"{max(0.0, reset or 0.0):.3f}s"
        if not self.allowed:
            out.update(retry_after_header(self.retry_after))
        return out

    def error(self) -> RateLimited:
        """The 429 to raise for a refusal (call only when not allowed)."""
        code = {"tokens_per_day": "insufficient_quota", "concurrent": "concurrency_limit_exceeded"}.get(
            self.limit or "", "rate_limit_exceeded"
        )
        error = RateLimited(self.message, code=code, headers=self.headers())
        if self.limit == "tokens_per_day":
            error.error_type = "insufficient_quota"  # OpenAI's type for an exhausted quota
        return error

    def raise_for_refusal(self) -> None:
        if not self.allowed:
            raise self.error()


def _describe(failure: Failure, scope: Scope, tokens: int) -> str:
    limit_value = getattr(scope.limits, failure.limit)
    label = failure.limit.replace("_", " ")
    if failure.never_fits:
        if failure.limit in ("tokens_per_minute", "tokens_per_day"):
            return (
                f"this request reserves {tokens} tokens (prompt + max_tokens), more than the {label} limit "
                f"of {limit_value} for {scope.name}; it can never fit: lower max_tokens or shorten the prompt"
            )
        return f"{label} is 0 for {scope.name}: requests are not allowed"
    if failure.limit == "concurrent":
        return f"too many concurrent requests for {scope.name} (limit {limit_value}); retry when one finishes"
    wait = "" if failure.retry_after is None else f"; retry in {failure.retry_after:.3f}s"
    return f"{label} limit of {limit_value} reached for {scope.name}{wait}"


def decide(
    scopes: list[Scope], states: list[ScopeState], failures: list[Failure], *, request_id: str, tokens: int
) -> Decision:
    """Shared by every backend: turn per-scope states and failures into a Decision.

    The named limit is the first never-fitting one if any (retrying is pointless), else the first
    failure in scope order. retry_after is the latest of the known waits: every scope must fit at once.
    """
    rpm = [s for s in states if s.limits.requests_per_minute is not None]
    tpm = [s for s in states if s.limits.tokens_per_minute is not None]
    req = min(rpm, key=lambda s: s.limits.requests_per_minute - s.requests, default=None)  # type: ignore[operator]
    tok = min(tpm, key=lambda s: s.limits.tokens_per_minute - s.tokens, default=None)  # type: ignore[operator]
    headers = {
        "limit_requests": req.limits.requests_per_minute if req else None,
        "remaining_requests": req.limits.requests_per_minute - req.requests if req else None,  # type: ignore[operator]
        "reset_requests": req.window_reset if req else None,
        "limit_tokens": tok.limits.tokens_per_minute if tok else None,
        "remaining_tokens": tok.limits.tokens_per_minute - tok.tokens if tok else None,  # type: ignore[operator]
        "reset_tokens": tok.window_reset if tok else None,
    }
    if not failures:
        return Decision(True, request_id, tokens, states=tuple(states), **headers)  # type: ignore[arg-type]
    never = [f for f in failures if f.never_fits]
    first = never[0] if never else failures[0]
    waits = [f.retry_after for f in failures if f.retry_after is not None]
    retry_after = None if never or not waits else max(waits)
    scope = scopes[first.scope_index]
    return Decision(
        False,
        request_id,
        tokens,
        limit=first.limit,
        scope=scope.name,
        retry_after=retry_after,
        never_fits=bool(never),
        message=_describe(Failure(first.scope_index, first.limit, retry_after, bool(never)), scope, tokens),
        states=tuple(states),
        **headers,  # type: ignore[arg-type]
    )


def normalize_scopes(scopes: list[Scope]) -> list[Scope]:
    """Merge repeated scope names (tightest wins) so a scope is never charged twice for one request."""
    merged: dict[str, Limits] = {}
    for scope in scopes:
        merged[scope.name] = scope.limits.tightest(merged[scope.name]) if scope.name in merged else scope.limits
    return [Scope(name, limits) for name, limits in merged.items()]


def validate_admission(scopes: list[Scope], request_id: str, tokens: int) -> list[Scope]:
    if not request_id:
        raise ValueError("request_id must be a non-empty string")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be a non-negative integer, got {tokens!r}")
    if not scopes:
        raise ValueError("admit needs at least one scope")
    return normalize_scopes(scopes)


class LimitStore(abc.ABC):
    """Backend-neutral limiter. Implementations: MemoryLimitStore (one process), RedisLimitStore (replicas)."""

    window_seconds: float
    lease_seconds: float
    # True when admit/settle never suspend (no await inside): they then cannot be cancelled half-way, so
    # callers may skip the task + shield they otherwise need (tens of microseconds per request), and
    # `settle_now` settles synchronously.
    runs_inline: bool = False

    def settle_now(self, request_id: str, actual_tokens: int) -> None:
        raise NotImplementedError("only stores that run inline settle synchronously")

    @abc.abstractmethod
    async def admit(self, scopes: list[Scope], *, request_id: str, tokens: int, now: float | None = None) -> Decision:
        """Atomically reserve 1 request, `tokens` and a concurrency slot in every scope, or nothing at all.

        Idempotent per request_id: admitting an id that holds a reservation returns allowed without
        counting again (so a retry after a lost reply cannot double-charge). Request ids must be unique.
        `now` (seconds since the epoch) is for tests; by default the backend's own clock is used.
        """

    @abc.abstractmethod
    async def settle(self, request_id: str, actual_tokens: int) -> None:
        """Lower the reservation to `actual_tokens` (clamped to [0, reserved]) and free the slot. Idempotent."""

    async def release(self, request_id: str, *, refund: bool = False) -> None:
        """Free the slot without a usage figure.

        refund=False keeps the whole reservation counted (the engine ran and usage is unknown: charge it);
        refund=True charges nothing (the request failed before anything was generated).
        """
        await self.settle(request_id, 0 if refund else 2**62)

    @abc.abstractmethod
    async def usage(self, scope_name: str, *, now: float | None = None) -> dict[str, float | int]:
        """Current counters of a scope: requests/tokens in the window, tokens today, in-flight requests."""

    async def in_flight(self, scope_name: str, *, now: float | None = None) -> int:
        return int((await self.usage(scope_name, now=now))["in_flight"])

    async def aclose(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Release connections (Redis); nothing to do in memory."""


SHARED_STORE_SCHEMES = ("redis://", "rediss://", "unix://")  # one limit shared by every replica (Redis)


def make_store(url: str, **options: float | str) -> LimitStore:
    """Choose the backend by URL: `memory://` (one process) or `redis://…` / `rediss://…` (shared)."""
    if url.startswith("memory://"):
        from server.policy.memory_store import MemoryLimitStore

        return MemoryLimitStore(**options)  # type: ignore[arg-type]
    if url.startswith(SHARED_STORE_SCHEMES):
        from server.policy.redis_store import RedisLimitStore

        return RedisLimitStore(url, **options)  # type: ignore[arg-type]
    raise ValueError(f"unsupported limit store URL {url.split('://')[0]!r}://; use memory:// or redis://")
