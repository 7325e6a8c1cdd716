"""Redis-only behaviour: replicas sharing one Redis, server time, TTLs, fail-closed and recovery."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from server.policy.errors import LimiterUnavailable
from server.policy.limits import Limits
from server.policy.redis_store import RedisLimitStore
from server.policy.store import Scope, make_store
from tests.policy.redis_support import REDIS_URL, free_port


def test_two_replicas_enforce_one_limit_under_load(redis_backend):
    async def scenario():
        a, b = redis_backend.store(), redis_backend.store()
        scopes = [
            Scope("key:k", Limits(requests_per_minute=50, tokens_per_minute=1_000, concurrent=30)),
            Scope("org:o", Limits(tokens_per_day=100_000)),
        ]

        async def burst(tag: str) -> list[str]:
            stores = (a, b)
            decisions = await asyncio.gather(
                *(stores[i % 2].admit(scopes, request_id=f"{tag}{i}", tokens=7) for i in range(200))
            )
            return [d.request_id for d in decisions if d.allowed]

        first = await burst("x")
        assert len(first) == 30  # the concurrency limit binds first, across both replicas
        assert await a.in_flight("key:k") == 30 and await b.in_flight("key:k") == 30
        await asyncio.gather(*((a, b)[i % 2].settle(rid, 5) for i, rid in enumerate(first)))
        assert await b.in_flight("key:k") == 0
        second = await burst("y")
        assert len(second) == 20  # then requests per minute: 50 in total
        usage = await a.usage("key:k")
        assert usage["requests"] == 50 and usage["tokens"] == 30 * 5 + 20 * 7
        assert (await b.usage("org:o"))["tokens_today"] == 30 * 5 + 20 * 7

    redis_backend.run(scenario)


def test_server_time_is_used_and_keys_expire(redis_backend):
    async def scenario():
        store = redis_backend.store(lease_seconds=30)
        d = await store.admit([Scope("key:t", Limits(requests_per_minute=5))], request_id="r", tokens=3)
        assert d.allowed and 59 < d.reset_requests <= 60
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{redis_backend.prefix}*"))
            assert len(keys) == 5  # log, tok, day, conc, reservation
            assert all(0 < client.pttl(k) <= 25 * 3_600_000 for k in keys), "every key must carry a TTL"
        finally:
            client.close()
        await store.settle("r", 1)
        assert (await store.usage("key:t"))["tokens"] == 1

    redis_backend.run(scenario)


def test_fails_closed_when_redis_is_unreachable():
    async def scenario():
        store = make_store(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable) as info:
            await store.admit([Scope("key:k", Limits())], request_id="r", tokens=1)
        assert info.value.status_code == 503 and "unavailable" in info.value.message
        assert time.monotonic() - started < 3
        with pytest.raises(LimiterUnavailable):
            await store.settle("r", 0)
        with pytest.raises(LimiterUnavailable):
            await store.usage("key:k")
        await store.aclose()

    asyncio.run(scenario())


def test_recovers_after_redis_restarts(private_redis):
    private_redis.start()

    async def scenario():
        store = RedisLimitStore(private_redis.url, prefix="sms:rec:", timeout=0.5)
        scopes = [Scope("key:k", Limits(concurrent=5))]
        assert (await store.admit(scopes, request_id="before", tokens=1)).allowed
        private_redis.stop()
        with pytest.raises(LimiterUnavailable):
            await store.admit(scopes, request_id="down", tokens=1)
        private_redis.start()
        recovered = None
        for attempt in range(20):  # redis-py reconnects by itself; no new store needed
            try:
                recovered = await store.admit(scopes, request_id=f"after{attempt}", tokens=1)
                break
            except LimiterUnavailable:
                await asyncio.sleep(0.1)
        assert recovered is not None and recovered.allowed
        await store.aclose()

    asyncio.run(scenario())
