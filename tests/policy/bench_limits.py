"""Latency of admit + settle over 3 scopes (key, user, org), memory and Redis on loopback.

Run: .venv/bin/python -m tests.policy.bench_limits [--n 5000] [--redis redis://127.0.0.1:6379/0] [--loop asyncio]
Runs on uvloop when it is installed, as uvicorn does (`--loop auto`), so the numbers match the server.
Not collected by pytest (no test_ prefix). Deletes only its own random Redis prefix afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import secrets
import statistics
import time

from server.policy.limits import Limits
from server.policy.memory_store import MemoryLimitStore
from server.policy.redis_store import RedisLimitStore
from server.policy.store import LimitStore, Scope

SCOPES = [
    Scope("key:bench", Limits(requests_per_minute=10**9, tokens_per_minute=10**12, concurrent=64)),
    Scope("user:bench", Limits(requests_per_minute=10**9, tokens_per_minute=10**12, tokens_per_day=10**15)),
    Scope("org:bench", Limits(tokens_per_day=10**15)),
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(store: LimitStore, n: int, warmup: int = 200) -> dict[str, float]:
    admit_us: list[float] = []
    total_us: list[float] = []
    for i in range(n + warmup):
        rid = f"b{i}"
        t0 = time.perf_counter()
        decision = await store.admit(SCOPES, request_id=rid, tokens=300)
        t1 = time.perf_counter()
        await store.settle(rid, 120)
        t2 = time.perf_counter()
        assert decision.allowed
        if i >= warmup:
            admit_us.append((t1 - t0) * 1e6)
            total_us.append((t2 - t0) * 1e6)
    return {
        "admit_p50": statistics.median(admit_us),
        "admit_p99": pct(admit_us, 0.99),
        "admit_settle_p50": statistics.median(total_us),
        "admit_settle_p99": pct(total_us, 0.99),
    }


async def main(args: argparse.Namespace) -> None:
    print("memory", {k: round(v, 1) for k, v in (await measure(MemoryLimitStore(), args.n)).items()})
    prefix = f"sms:bench:{secrets.token_hex(4)}:"
    store = RedisLimitStore(args.redis, prefix=prefix)
    try:
        pings = []
        for _ in range(2000):  # the floor: one redis-py round trip on this machine
            t0 = time.perf_counter()
            await store.ping()
            pings.append((time.perf_counter() - t0) * 1e6)
        print("redis PING p50", round(statistics.median(pings[200:]), 1))
        print("redis ", {k: round(v, 1) for k, v in (await measure(store, args.n)).items()})
    finally:
        client = store._client
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await store.aclose()


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args()
    use_uvloop = args.loop == "uvloop" or (args.loop == "auto" and importlib.util.find_spec("uvloop") is not None)
    print("event loop:", "uvloop" if use_uvloop else "asyncio")
    if use_uvloop:
        import uvloop

        uvloop.run(main(args))
    else:
        asyncio.run(main(args))


if __name__ == "__main__":
    cli()
