"""PoolGate: caps never exceeded, slots never leaked (cancellation included), fairness, bounds, states."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from server.policy.errors import PoolBusy
from server.policy.pool_gate import PoolGate


def run(coro):
    return asyncio.run(coro)


def test_caps_hold_and_no_slot_leaks_under_random_cancellation():
    async def scenario():
        gate = PoolGate("gpu0", total_concurrency=8, per_key_cap=2, queue_length=300, queue_timeout=5)
        rng = random.Random(3)
        inside: Counter[str] = Counter()
        violations: list[str] = []
        done = asyncio.Event()

        async def request(key: str) -> None:
            ticket = await gate.acquire(key)
            inside[key] += 1
            if inside[key] > 2 or sum(inside.values()) > 8:
                violations.append(f"{key}: {dict(inside)}")
            try:
                await asyncio.sleep(rng.random() * 0.004)
            finally:
                inside[key] -= 1
                gate.release(ticket)  # hands the slot to a waiter synchronously ...
                if rng.random() < 0.3:
                    rng.choice(tasks).cancel()  # ... which may be cancelled before it runs

        async def sampler() -> None:
            while not done.is_set():
                snap = gate.snapshot()
                if snap["in_flight"] > 8 or any(n > 2 for n in snap["in_flight_by_key"].values()):
                    violations.append(f"snapshot {snap}")
                if sum(snap["in_flight_by_key"].values()) != snap["in_flight"]:
                    violations.append(f"inconsistent {snap}")
                await asyncio.sleep(0)

        sampling = asyncio.create_task(sampler())
        tasks = [asyncio.create_task(request(f"k{i % 20}")) for i in range(200)]
        for _ in range(70):  # cancel at random moments: some queued, some running, some at hand-off
            await asyncio.sleep(rng.random() * 0.002)
            rng.choice(tasks).cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        done.set()
        await sampling
        assert not violations, violations[:3]
        assert any(isinstance(r, asyncio.CancelledError) for r in results)
        assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
        snap = gate.snapshot()
        assert (snap["in_flight"], snap["queued"], snap["in_flight_by_key"], snap["queued_by_key"]) == (0, 0, {}, {})

    run(scenario())


def test_slot_granted_and_cancelled_in_the_same_instant_is_returned():
    async def scenario():
        gate = PoolGate("gpu0", total_concurrency=1, per_key_cap=1, queue_length=10, queue_timeout=5)
        holder = await gate.acquire("a")
        waiter = asyncio.create_task(gate.acquire("b"))
        await asyncio.sleep(0)
        assert gate.queued == 1
        gate.release(holder)  # hands the slot to b's future synchronously ...
        assert gate.snapshot()["in_flight_by_key"] == {"b": 1}
        waiter.cancel()  # ... and b's client disconnects before b's task ever runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.in_flight == 0 and gate.queued == 0
        third = await asyncio.wait_for(gate.acquire("c"), 1)
        gate.release(third)
        gate.release(third)  # idempotent
        assert gate.in_flight == 0

    run(scenario())


def test_cancel_while_queued_and_exception_in_body_release():
    async def scenario():
        gate = PoolGate("gpu0", total_concurrency=1, per_key_cap=1, queue_length=10, queue_timeout=5)
        holder = await gate.acquire("a")
        queued = asyncio.create_task(gate.acquire("b"))
        await asyncio.sleep(0)
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        assert gate.queued == 0 and gate.snapshot()["queued_by_key"] == {}
        gate.release(holder)
        with pytest.raises(RuntimeError):
            async with gate.slot("a"):
                raise RuntimeError("engine failed")
        assert gate.in_flight == 0

    run(scenario())


def test_round_robin_fairness_across_keys():
    async def scenario():
        gate = PoolGate("gpu0", total_concurrency=1, per_key_cap=1, queue_length=200, queue_timeout=10)
        order: list[str] = []

        async def request(key: str, n: int) -> None:
            async with gate.slot(key):
                order.append(f"{key}{n}")
                await asyncio.sleep(0)

        first = await gate.acquire("a")
        burst = [asyncio.create_task(request("a", i)) for i in range(100)]
        await asyncio.sleep(0)
        single = asyncio.create_task(request("b", 0))
        await asyncio.sleep(0)
        assert gate.snapshot()["queued_by_key"] == {"a": 100, "b": 1}
        gate.release(first)
        await asyncio.gather(*burst, single)
        assert order.index("b0") <= 1  # behind at most one of a's 100 waiters
        assert order[:1] == ["a0"] and [x for x in order if x.startswith("a")] == [f"a{i}" for i in range(100)]

    run(scenario())


def test_queue_bound_gives_429_for_key_cap_and_503_when_saturated():
    async def scenario():
        gate = PoolGate("gpu0", total_concurrency=2, per_key_cap=1, queue_length=2, queue_timeout=5)
        a, b = await gate.acquire("a"), await gate.acquire("b")
        waiters = [asyncio.create_task(gate.acquire(k)) for k in ("a", "c")]
        await asyncio.sleep(0)
        with pytest.raises(PoolBusy) as key_cap:
            await gate.acquire("a")  # queue full and "a" is at its own cap: the caller's problem
        assert key_cap.value.kind == "key_cap" and key_cap.value.status_code == 429
        assert key_cap.value.headers["Retry-After"] == "1"
        with pytest.raises(PoolBusy) as saturated:
            await gate.acquire("d")  # queue full, "d" holds nothing: the pool is saturated
        assert saturated.value.kind == "saturated" and saturated.value.status_code == 503
        gate.release(a)
        gate.release(b)
        for ticket in await asyncio.gather(*waiters):
            gate.release(ticket)
        assert gate.in_flight == 0 and gate.queued == 0

    run(scenario())


def test_per_key_queue_bound_keeps_room_for_other_keys():
    async def scenario():
        gate = PoolGate("gpu0", 1, 1, queue_length=10, queue_timeout=5, per_key_queue=2)
        holder = await gate.acquire("a")
        waiters = [asyncio.create_task(gate.acquire("a")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(PoolBusy) as info:
            await gate.acquire("a")
        assert info.value.kind == "key_cap"
        other = asyncio.create_task(gate.acquire("b"))
        await asyncio.sleep(0)
        assert gate.queued == 3
        for task in [*waiters, other]:
            task.cancel()
        await asyncio.gather(*waiters, other, return_exceptions=True)
        gate.release(holder)
        assert gate.in_flight == 0 and gate.queued == 0

    run(scenario())


def test_queue_timeout():
    async def scenario():
        gate = PoolGate("gpu0", total_concurrency=1, per_key_cap=1, queue_length=5, queue_timeout=0.05)
        holder = await gate.acquire("a")
        with pytest.raises(PoolBusy) as info:
            await gate.acquire("b")
        assert info.value.kind == "timeout" and info.value.status_code == 503
        assert gate.queued == 0
        gate.release(holder)
        assert gate.in_flight == 0

    run(scenario())


@pytest.mark.parametrize("state", ["draining", "isolated"])
def test_drain_and_isolate(state):
    async def scenario():
        gate = PoolGate("gpu0", total_concurrency=1, per_key_cap=1, queue_length=5, queue_timeout=5)
        finished = []

        async def running() -> None:
            async with gate.slot("a"):
                await asyncio.sleep(0.02)
                finished.append("a")

        in_flight = asyncio.create_task(running())
        await asyncio.sleep(0)
        queued = asyncio.create_task(gate.acquire("b"))
        await asyncio.sleep(0)
        gate.drain() if state == "draining" else gate.isolate()
        with pytest.raises(PoolBusy) as waiting:
            await queued
        assert waiting.value.kind == state and waiting.value.status_code == 503
        with pytest.raises(PoolBusy) as new:
            await gate.acquire("c")
        assert new.value.kind == state and gate.snapshot()["state"] == state
        await gate.wait_idle()
        await in_flight
        assert finished == ["a"] and gate.in_flight == 0  # in-flight work was allowed to finish
        gate.resume()
        gate.release(await gate.acquire("c"))

    run(scenario())
