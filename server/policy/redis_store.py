"""Redis-backed limit store: one set of limits for every replica sharing a Redis.

The only module in the codebase that imports `redis`. Each admit and settle is one Lua script (EVALSHA,
reloaded automatically on NOSCRIPT), so the check-then-write is atomic across all scopes and replicas.
Any Redis failure raises `LimiterUnavailable`: the caller refuses with 503 (fail closed). redis-py's
pool reconnects on the next call once Redis is back, so recovery needs no restart.

Deployment note: scripts touch keys of several scopes, so use a standalone Redis (or Sentinel). On a
Redis Cluster give the prefix a hash tag, e.g. "sms:lim:{limits}:", to place every key on one slot.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from server.policy import redis_scripts
from server.policy.errors import LimiterUnavailable
from server.policy.store import (
    DAY_SECONDS,
    DEFAULT_LEASE_SECONDS,
    LIMIT_NAMES,
    WINDOW_SECONDS,
    Decision,
    Failure,
    LimitStore,
    Scope,
    ScopeState,
    decide,
    validate_admission,
)

_US = 1_000_000


def _us(seconds: float) -> int:
    return round(seconds * _US)


def _arg(value: int | None) -> int:
    return -1 if value is None else value


class RedisLimitStore(LimitStore):
    """Exact sliding-window limits in Redis; see `store.py` for the accounting model.

    `timeout` bounds every Redis call (connect and read) so a hung Redis turns into a fast 503, not into
    requests piling up behind the limiter. One retry covers a connection the server closed (restart);
    a retried admit is harmless because admit is idempotent per request_id.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sms:lim:",
        window_seconds: float = WINDOW_SECONDS,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        timeout: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        self.prefix = prefix
        self.window_seconds = float(window_seconds)
        self.lease_seconds = float(lease_seconds)
        # Bursts queue on the semaphore for one of `max_connections` pooled connections; redis-py's own
        # BlockingConnectionPool does the same but costs ~25 µs more per call.
        pool = aioredis.ConnectionPool.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
            max_connections=max_connections,
        )
        self._client = aioredis.Redis.from_pool(pool)
        self._slots = asyncio.Semaphore(max_connections)
        self._admit = self._client.register_script(redis_scripts.ADMIT)
        self._settle = self._client.register_script(redis_scripts.SETTLE)
        self._usage = self._client.register_script(redis_scripts.USAGE)

    def _scope_keys(self, name: str) -> list[str]:
        base = f"{self.prefix}s:{name}"
        return [f"{base}:log", f"{base}:tok", f"{base}:day", f"{base}:conc"]

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            async with self._slots:
                return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            # The cause stays chained for the server log; the client only learns that limits are unavailable.
            raise LimiterUnavailable() from exc

    async def admit(self, scopes: list[Scope], *, request_id: str, tokens: int, now: float | None = None) -> Decision:
        scopes = validate_admission(scopes, request_id, tokens)
        keys = [f"{self.prefix}r:{request_id}"]
        limits: list[int | None] = []
        for scope in scopes:
            keys.extend(self._scope_keys(scope.name))
            lim = scope.limits
            limits += [lim.requests_per_minute, lim.tokens_per_minute, lim.tokens_per_day, lim.concurrent]
        args = [
            request_id,
            tokens,
            "" if now is None else _us(now),
            _us(self.window_seconds),
            _us(self.lease_seconds),
            ",".join(str(_arg(v)) for v in limits),
            json.dumps([scope.name for scope in scopes]),
        ]
        reply = [int(x) for x in (await self._call(self._admit, keys, args)).split(b",")]
        return self._decision(scopes, reply, request_id=request_id, tokens=tokens)

    @staticmethod
    def _decision(scopes: list[Scope], reply: list[int], *, request_id: str, tokens: int) -> Decision:
        nfail, pos = reply[1], 2
        failures = []
        for _ in range(nfail):
            index, code, wait, never = reply[pos : pos + 4]
            pos += 4
            failures.append(Failure(index - 1, LIMIT_NAMES[code - 1], None if wait < 0 else wait / _US, bool(never)))
        states = []
        for scope in scopes:
            requests, used, today, inflight, reset = reply[pos : pos + 5]
            pos += 5
            states.append(ScopeState(scope.name, scope.limits, requests, used, today, inflight, reset / _US))
        return decide(scopes, states, failures if reply[0] == 0 else [], request_id=request_id, tokens=tokens)

    async def settle(self, request_id: str, actual_tokens: int) -> None:
        keys = [f"{self.prefix}r:{request_id}"]
        await self._call(self._settle, keys, [max(0, int(actual_tokens)), self.prefix, request_id])

    async def usage(self, scope_name: str, *, now: float | None = None) -> dict[str, float | int]:
        args = ["" if now is None else _us(now), _us(self.window_seconds)]
        reply = [int(x) for x in await self._call(self._usage, self._scope_keys(scope_name), args)]
        requests, used, today, inflight, reset, now_us = reply
        day_reset = ((now_us // (DAY_SECONDS * _US)) + 1) * DAY_SECONDS - now_us / _US
        return {
            "requests": requests,
            "tokens": used,
            "tokens_today": today,
            "in_flight": inflight,
            "window_seconds": self.window_seconds,
            "window_reset": reset / _US,
            "day_reset": day_reset,
        }

    async def ping(self) -> None:
        """Readiness probe: raises LimiterUnavailable when Redis cannot be reached."""
        try:
            async with self._slots:
                await self._client.ping()
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable() from exc

    async def aclose(self) -> None:
        await self._client.aclose()
