"""In-process limit store for a single replica (laptop, tests, one-host deployments).

Atomicity comes from the event loop: `admit` and `settle` contain no `await`, so no other task can run
between the check and the write. The data structures mirror the Redis ones (sliding log per scope, UTC
day counter, lease set) so both backends give the same answers to the same contract tests.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from server.policy.limits import Limits
from server.policy.store import (
    DAY_SECONDS,
    DEFAULT_LEASE_SECONDS,
    WINDOW_SECONDS,
    Decision,
    Failure,
    LimitStore,
    Scope,
    ScopeState,
    decide,
    validate_admission,
)


@dataclass
class _Entry:
    ts: float
    request_id: str
    tokens: int


@dataclass
class _ScopeData:
    log: deque[_Entry] = field(default_factory=deque)  # ordered by ts (time never moves backwards here)
    by_id: dict[str, _Entry] = field(default_factory=dict)
    window_tokens: int = 0
    day: int = -1
    day_tokens: int = 0
    leases: dict[str, float] = field(default_factory=dict)  # request_id -> lease deadline
    lease_heap: list[tuple[float, str]] = field(default_factory=list)  # lazy deletion

    def trim(self, now: float, window: float) -> None:
        horizon = now - window
        while self.log and self.log[0].ts <= horizon:
            entry = self.log.popleft()
            self.by_id.pop(entry.request_id, None)
            self.window_tokens -= entry.tokens

    def reap_leases(self, now: float) -> None:
        heap = self.lease_heap
        while heap and heap[0][0] <= now:
            deadline, request_id = heapq.heappop(heap)
            if self.leases.get(request_id) == deadline:
                del self.leases[request_id]
        if len(heap) > 2 * len(self.leases) + 64:  # settled leases leave stale heap entries behind
            self.lease_heap = [(d, r) for r, d in self.leases.items()]
            heapq.heapify(self.lease_heap)

    def tokens_on(self, day: int) -> int:
        return self.day_tokens if self.day == day else 0

    def state(self, scope: Scope, now: float, window: float, day: int) -> ScopeState:
        reset = self.log[-1].ts + window - now if self.log else 0.0
        return ScopeState(
            scope.name, scope.limits, len(self.log), self.window_tokens, self.tokens_on(day), len(self.leases), reset
        )

    def empty(self, day: int) -> bool:
        return not self.log and not self.leases and self.tokens_on(day) == 0


@dataclass
class _Reservation:
    scopes: tuple[str, ...]
    tokens: int
    ts: float
    day: int


class MemoryLimitStore(LimitStore):
    """Exact sliding-window limits in plain dicts; see `store.py` for the accounting model."""

    runs_inline = True

    def __init__(self, *, window_seconds: float = WINDOW_SECONDS, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.window_seconds = float(window_seconds)
        self.lease_seconds = float(lease_seconds)
        self._scopes: dict[str, _ScopeData] = {}
        self._reservations: dict[str, _Reservation] = {}
        self._last_now = 0.0
        self._last_sweep = 0.0

    def _clock(self, now: float | None) -> float:
        # Monotonic clamp: the sliding log's exactness needs timestamps that never go backwards, and the
        # wall clock (needed for the UTC day) can step back under NTP.
        t = time.time() if now is None else float(now)
        self._last_now = max(self._last_now, t)
        return self._last_now

    async def admit(self, scopes: list[Scope], *, request_id: str, tokens: int, now: float | None = None) -> Decision:
        scopes = validate_admission(scopes, request_id, tokens)
        t = self._clock(now)
        self._maybe_sweep(t)
        day = int(t // DAY_SECONDS)
        datas = [self._scopes.setdefault(s.name, _ScopeData()) for s in scopes]
        for data in datas:
            data.trim(t, self.window_seconds)
            data.reap_leases(t)
        if request_id in self._reservations:
            states = [d.state(s, t, self.window_seconds, day) for s, d in zip(scopes, datas, strict=True)]
            return decide(scopes, states, [], request_id=request_id, tokens=tokens)

        failures: list[Failure] = []
        for index, (scope, data) in enumerate(zip(scopes, datas, strict=True)):
            failures.extend(self._check(index, scope.limits, data, tokens, t, day))
        if not failures:
            deadline = t + self.lease_seconds
            for data in datas:
                entry = _Entry(t, request_id, tokens)
                data.log.append(entry)
                data.by_id[request_id] = entry
                data.window_tokens += tokens
                if data.day != day:
                    data.day, data.day_tokens = day, 0
                data.day_tokens += tokens
                data.leases[request_id] = deadline
                heapq.heappush(data.lease_heap, (deadline, request_id))
            self._reservations[request_id] = _Reservation(tuple(s.name for s in scopes), tokens, t, day)
        states = [d.state(s, t, self.window_seconds, day) for s, d in zip(scopes, datas, strict=True)]
        return decide(scopes, states, failures, request_id=request_id, tokens=tokens)

    def _check(self, index: int, limits: Limits, data: _ScopeData, tokens: int, now: float, day: int) -> list[Failure]:
        out: list[Failure] = []
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        tpd, conc = limits.tokens_per_day, limits.concurrent
        if rpm == 0:
            out.append(Failure(index, "requests_per_minute", None, never_fits=True))
        elif rpm is not None and len(data.log) + 1 > rpm:
            # The (count - rpm + 1)-th oldest entry must leave the window before one more request fits.
            oldest = data.log[len(data.log) - rpm]
            out.append(Failure(index, "requests_per_minute", oldest.ts + self.window_seconds - now))
        if tpm is not None and tokens > tpm:
            out.append(Failure(index, "tokens_per_minute", None, never_fits=True))
        elif tpm is not None and data.window_tokens + tokens > tpm:
            need, freed, wait = data.window_tokens + tokens - tpm, 0, self.window_seconds
            for entry in data.log:
                freed += entry.tokens
                if freed >= need:
                    wait = entry.ts + self.window_seconds - now
                    break
            out.append(Failure(index, "tokens_per_minute", wait))
        if tpd is not None and tokens > tpd:
            out.append(Failure(index, "tokens_per_day", None, never_fits=True))
        elif tpd is not None and data.tokens_on(day) + tokens > tpd:
            out.append(Failure(index, "tokens_per_day", (day + 1) * DAY_SECONDS - now))
        if conc == 0:
            out.append(Failure(index, "concurrent", None, never_fits=True))
        elif conc is not None and len(data.leases) + 1 > conc:
            out.append(Failure(index, "concurrent", None))
        return out

    async def settle(self, request_id: str, actual_tokens: int) -> None:
        self.settle_now(request_id, actual_tokens)

    def settle_now(self, request_id: str, actual_tokens: int) -> None:
        """`settle` without the coroutine: the memory store never waits, so callers may settle inline."""
        reservation = self._reservations.pop(request_id, None)
        if reservation is None:
            return  # already settled, never admitted, or expired: idempotent no-op
        refund = reservation.tokens - max(0, min(reservation.tokens, int(actual_tokens)))
        for name in reservation.scopes:
            data = self._scopes.get(name)
            if data is None:
                continue
            entry = data.by_id.get(request_id)
            if entry is not None and refund:
                entry.tokens -= refund
                data.window_tokens -= refund
            if data.day == reservation.day and refund:
                data.day_tokens = max(0, data.day_tokens - refund)
            data.leases.pop(request_id, None)

    async def usage(self, scope_name: str, *, now: float | None = None) -> dict[str, float | int]:
        t = self._clock(now)
        day = int(t // DAY_SECONDS)
        data = self._scopes.get(scope_name, _ScopeData())
        data.trim(t, self.window_seconds)
        data.reap_leases(t)
        state = data.state(Scope(scope_name, Limits()), t, self.window_seconds, day)
        return {
            "requests": state.requests,
            "tokens": state.tokens,
            "tokens_today": state.tokens_today,
            "in_flight": state.in_flight,
            "window_seconds": self.window_seconds,
            "window_reset": state.window_reset,
            "day_reset": (day + 1) * DAY_SECONDS - t,
        }

    def _maybe_sweep(self, now: float) -> None:
        """Forget idle scopes and abandoned reservations once per window, so memory stays bounded."""
        if now - self._last_sweep < self.window_seconds:
            return
        self._last_sweep = now
        day = int(now // DAY_SECONDS)
        for name in list(self._scopes):
            data = self._scopes[name]
            data.trim(now, self.window_seconds)
            data.reap_leases(now)
            if data.empty(day):
                del self._scopes[name]
        keep = self.lease_seconds + self.window_seconds + 60
        for request_id in [r for r, res in self._reservations.items() if now - res.ts > keep]:
            del self._reservations[request_id]

    @property
    def scope_count(self) -> int:
        return len(self._scopes)
