"""Admitter: store reservation + pool slot are given back exactly once on every path."""

from __future__ import annotations

import asyncio
import gc

import pytest

from server.policy.admission import Admitter
from server.policy.errors import PoolBusy, RateLimited
from server.policy.limits import Limits
from server.policy.memory_store import MemoryLimitStore
from server.policy.pool_gate import PoolGate
from server.policy.store import Scope

SCOPES = [Scope("key:k", Limits(requests_per_minute=100, tokens_per_minute=1_000, concurrent=4))]


def setup(total: int = 2, timeout: float = 5) -> tuple[Admitter, MemoryLimitStore, PoolGate]:
    store = MemoryLimitStore()
    gate = PoolGate("gpu0", total_concurrency=total, per_key_cap=total, queue_length=4, queue_timeout=timeout)
    return Admitter(store, {"gpu0": gate}), store, gate


async def usage(store: MemoryLimitStore) -> tuple[int, int]:
    u = await store.usage("key:k")
    return int(u["tokens"]), int(u["in_flight"])


def test_admit_and_finish():
    async def scenario():
        admitter, store, gate = setup()
        admission = await admitter.admit(SCOPES, pool="gpu0", gate_key="k", request_id="r1", tokens=300)
        assert admission.headers["x-ratelimit-remaining-tokens"] == "700"
        assert gate.in_flight == 1 and await usage(store) == (300, 1)
        await admission.finish(120)
        await admission.finish(0)  # idempotent
        assert gate.in_flight == 0 and await usage(store) == (120, 0)

    asyncio.run(scenario())


def test_limit_refusal_takes_no_slot():
    async def scenario():
        admitter, store, gate = setup()
        with pytest.raises(RateLimited) as info:
            await admitter.admit(SCOPES, pool="gpu0", gate_key="k", request_id="r1", tokens=5_000)
        assert "never fit" in info.value.message and gate.in_flight == 0

    asyncio.run(scenario())


def test_pool_refusal_and_cancelled_wait_refund_the_reservation():
    async def scenario():
        admitter, store, gate = setup(total=1, timeout=0.05)
        first = await admitter.admit(SCOPES, pool="gpu0", gate_key="k", request_id="r1", tokens=100)
        with pytest.raises(PoolBusy):  # queue timeout
            await admitter.admit(SCOPES, pool="gpu0", gate_key="k", request_id="r2", tokens=100)
        assert await usage(store) == (100, 1)
        waiting = asyncio.create_task(admitter.admit(SCOPES, pool="gpu0", gate_key="k", request_id="r3", tokens=100))
        await asyncio.sleep(0.01)
        waiting.cancel()  # client went away while queued for the pool
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await usage(store) == (100, 1) and gate.queued == 0
        await first.finish(None)  # usage unknown: the whole reservation is charged
        assert await usage(store) == (100, 0) and gate.in_flight == 0

    asyncio.run(scenario())


def test_cancelled_during_store_call_is_undone():
    class SlowStore(MemoryLimitStore):
        async def admit(self, *args, **kwargs):
            await asyncio.sleep(0.02)
            return await super().admit(*args, **kwargs)

    async def scenario():
        store = SlowStore()
        admitter = Admitter(store, {"gpu0": PoolGate("gpu0", 1, 1, 1, 1)})
        task = asyncio.create_task(admitter.admit(SCOPES, pool="gpu0", gate_key="k", request_id="r", tokens=50))
        await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        await admitter.aclose()
        assert await usage(store) == (0, 0)

    asyncio.run(scenario())


def test_finish_completes_even_if_the_caller_is_cancelled():
    async def scenario():
        admitter, store, gate = setup()
        admission = await admitter.admit(SCOPES, pool="gpu0", gate_key="k", request_id="r1", tokens=300)
        finishing = asyncio.create_task(admission.finish(10))
        await asyncio.sleep(0)
        finishing.cancel()
        await asyncio.gather(finishing, return_exceptions=True)
        await admitter.aclose()
        assert gate.in_flight == 0 and await usage(store) == (10, 0)

    asyncio.run(scenario())


def test_dropped_admission_is_released():
    async def scenario():
        admitter, store, gate = setup()
        admission = await admitter.admit(SCOPES, pool="gpu0", gate_key="k", request_id="r1", tokens=300)
        del admission  # e.g. a streaming generator that never started, so its finally never ran
        gc.collect()
        assert gate.in_flight == 0
        await asyncio.sleep(0.01)
        await admitter.aclose()
        assert await usage(store) == (300, 0)  # usage unknown: charged in full, slot freed

    asyncio.run(scenario())
