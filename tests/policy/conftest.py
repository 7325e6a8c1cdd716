"""Fixtures for the limit-store contract suite: one parametrized backend per test, memory and Redis.

Each Redis test gets its own random key prefix on the shared Redis and deletes only that prefix
afterwards (never FLUSHALL/FLUSHDB: other suites and replicas use the same server).
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.policy.memory_store import MemoryLimitStore
from server.policy.redis_store import RedisLimitStore
from server.policy.store import LimitStore
from tests.policy.redis_support import REDIS_URL, PrivateRedis, delete_prefix, redis_available


class Backend:
    """Builds stores of one kind inside the test's event loop and closes them at the end of `run`."""

    def __init__(self, kind: str, prefix: str) -> None:
        self.kind = kind
        self.prefix = prefix
        self._open: list[LimitStore] = []

    def store(self, **options: Any) -> LimitStore:
        if self.kind == "memory":
            store: LimitStore = MemoryLimitStore(**options)
        else:
            store = RedisLimitStore(REDIS_URL, prefix=self.prefix, **options)
        self._open.append(store)
        return store

    def run(self, scenario: Callable[[], Awaitable[Any]]) -> Any:
        async def wrapped() -> Any:
            try:
                return await scenario()
            finally:
                for store in self._open:
                    await store.aclose()
                self._open.clear()

        return asyncio.run(wrapped())


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    prefix = f"sms:test:{secrets.token_hex(6)}:"
    if request.param == "redis" and not redis_available():
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    yield Backend(request.param, prefix)
    if request.param == "redis":
        delete_prefix(prefix)


@pytest.fixture
def redis_backend() -> Iterator[Backend]:
    if not redis_available():
        pytest.skip(f"Redis not reachable at {REDIS_URL}")
    prefix = f"sms:test:{secrets.token_hex(6)}:"
    yield Backend("redis", prefix)
    delete_prefix(prefix)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed")
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()
