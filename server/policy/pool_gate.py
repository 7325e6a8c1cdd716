"""Fair, bounded admission to one GPU pool on this replica.

The store's `concurrent` limit is global (all replicas); this gate is local: it keeps a pool from being
handed more work than it can run and stops one key from filling it. A request takes a slot if the pool
has room and its key is under `per_key_cap`; otherwise it waits in a bounded queue served round-robin
across keys (FIFO within a key), so a key with a burst of 100 waiters delays another key's single
request by at most one slot hand-off, not 100.

Slot safety: a slot is released on every path (normal exit, exception, cancellation), including a task
cancelled while queued and the race where a slot is handed to a waiter just as it is cancelled: the
grant happens synchronously (counts updated, future resolved) and the cancelled waiter gives the slot
straight back. Everything runs on one event loop; no method awaits while it holds inconsistent state.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal

from server.policy.errors import PoolBusy

GateState = Literal["open", "draining", "isolated"]


@dataclass(eq=False)
class Ticket:
    """Proof of a held slot; pass it back to `release` (idempotent)."""

    gate: str
    key: str
    acquired_at: float
    released: bool = False


@dataclass(eq=False)
class _Waiter:
    key: str
    future: asyncio.Future[Ticket]
    queued: bool = True
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class PoolGate:
    """Per-pool concurrency gate with per-key caps, a bounded fair queue, and drain/isolate states."""

    def __init__(
        self,
        name: str,
        total_concurrency: int,
        per_key_cap: int,
        queue_length: int,
        queue_timeout: float,
        *,
        per_key_queue: int | None = None,
    ) -> None:
        if total_concurrency < 1 or per_key_cap < 1 or queue_length < 0 or queue_timeout <= 0:
            raise ValueError("total_concurrency, per_key_cap >= 1, queue_length >= 0 and queue_timeout > 0")
        self.name = name
        self.total_concurrency = total_concurrency
        self.per_key_cap = per_key_cap
        self.queue_length = queue_length
        # Without a per-key queue bound one key could fill the whole queue and turn everyone else away.
        self.per_key_queue = queue_length if per_key_queue is None else per_key_queue
        self.queue_timeout = queue_timeout
        self.state: GateState = "open"
        self._in_flight: dict[str, int] = {}
        self._total = 0
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # rotation order of keys
        self._queued = 0
        self._hold_seconds = 1.0  # moving average of slot hold time, for Retry-After
        self._idle_waiters: list[asyncio.Future[None]] = []

    # -- acquiring and releasing ------------------------------------------------------------------

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[Ticket]:
        """`async with gate.slot(key_id):` holds a slot for the body and always gives it back."""
        ticket = await self.acquire(key)
        try:
            yield ticket
        finally:
            self.release(ticket)

    async def acquire(self, key: str) -> Ticket:
        """Take a slot now, or queue for one. Raises PoolBusy when refused, queued too long or closed."""
        self._refuse_if_closed()
        if key not in self._queues and self._has_room(key):
            return self._grant(key)  # nobody of this key is ahead; other keys' waiters are all key-capped
        own_queue = len(self._queues.get(key, ()))
        if own_queue >= self.per_key_queue or self._queued >= self.queue_length:
            key_capped = own_queue >= self.per_key_queue or self._in_flight.get(key, 0) >= self.per_key_cap
            if key_capped:
                message = f"too many concurrent requests for this key on pool {self.name}"
                raise PoolBusy("key_cap", message, retry_after=self._hold_seconds)
            message = f"pool {self.name} is at capacity; retry shortly"
            raise PoolBusy("saturated", message, retry_after=self._hold_seconds)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(key, loop.create_future())
        self._queues.setdefault(key, deque()).append(waiter)
        self._queued += 1
        waiter.timer = loop.call_later(self.queue_timeout, self._expire, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        finally:
            waiter.timer.cancel()

    def release(self, ticket: Ticket) -> None:
        """Give a slot back and hand it to the next waiter in round-robin order. Idempotent."""
        if ticket.released:
            return
        if ticket.gate != self.name:
            raise ValueError(f"ticket of pool {ticket.gate} released on pool {self.name}")
        ticket.released = True
        held = time.monotonic() - ticket.acquired_at
        self._hold_seconds = 0.8 * self._hold_seconds + 0.2 * held
        left = self._in_flight[ticket.key] - 1
        if left:
            self._in_flight[ticket.key] = left
        else:
            del self._in_flight[ticket.key]
        self._total -= 1
        self._dispatch()
        if self._total == 0:
            for fut in self._idle_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._idle_waiters.clear()

    # -- internals (all synchronous: atomic on the event loop) ---------------------------------------

    def _has_room(self, key: str) -> bool:
        return self._total < self.total_concurrency and self._in_flight.get(key, 0) < self.per_key_cap

    def _grant(self, key: str) -> Ticket:
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        self._total += 1
        return Ticket(self.name, key, time.monotonic())

    def _unqueue(self, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        waiter.queued = False
        self._queued -= 1
        queue = self._queues.get(waiter.key)
        if queue is not None:
            with suppress(ValueError):
                queue.remove(waiter)
            if not queue:
                del self._queues[waiter.key]

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiting task was cancelled (client gone). If a slot was granted in the same instant, return it."""
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.release(fut.result())
        else:
            self._unqueue(waiter)

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        self._unqueue(waiter)
        waiter.future.set_exception(
            PoolBusy("timeout", f"waited {self.queue_timeout:g}s for pool {self.name}", retry_after=self._hold_seconds)
        )

    def _dispatch(self) -> None:
        """Fill free slots from the queue: the first key in rotation order that is under its cap, then
        move that key to the back. Waiters whose task was already cancelled are dropped on the way."""
        while self.state == "open" and self._total < self.total_concurrency and self._queues:
            chosen = None
            for key in list(self._queues):
                queue = self._queues[key]
                while queue and queue[0].future.done():
                    self._unqueue(queue[0])
                if key in self._queues and self._in_flight.get(key, 0) < self.per_key_cap:
                    chosen = key
                    break
            if chosen is None:
                return
            waiter = self._queues[chosen][0]
            self._unqueue(waiter)
            if chosen in self._queues:
                self._queues.move_to_end(chosen)
            waiter.future.set_result(self._grant(chosen))

    def _closed_error(self) -> PoolBusy | None:
        if self.state == "draining":
            return PoolBusy("draining", f"pool {self.name} is draining; retry on another replica")
        if self.state == "isolated":
            return PoolBusy("isolated", f"pool {self.name} is isolated and accepts no new requests")
        return None

    def _refuse_if_closed(self) -> None:
        error = self._closed_error()
        if error is not None:
            raise error

    # -- runtime state ---------------------------------------------------------------------------

    def drain(self) -> None:
        """Finish in-flight requests, admit nothing new; queued waiters are refused (they never started)."""
        self._close("draining")

    def isolate(self) -> None:
        """Refuse everything new at once (e.g. a GPU with errors); in-flight requests continue."""
        self._close("isolated")

    def resume(self) -> None:
        self.state = "open"
        self._dispatch()

    def _close(self, state: GateState) -> None:
        self.state = state
        for queue in list(self._queues.values()):
            for waiter in list(queue):
                self._unqueue(waiter)
                error = self._closed_error()
                if error is not None and not waiter.future.done():
                    waiter.future.set_exception(error)

    async def wait_idle(self) -> None:
        """Wait until nothing is in flight (the end of a drain)."""
        if self._total == 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(fut)
        await fut

    @property
    def in_flight(self) -> int:
        return self._total

    @property
    def queued(self) -> int:
        return self._queued

    def snapshot(self) -> dict[str, Any]:
        """For metrics and the admin API: state, totals, and per-key in-flight and queued counts."""
        return {
            "name": self.name,
            "state": self.state,
            "total_concurrency": self.total_concurrency,
            "per_key_cap": self.per_key_cap,
            "queue_length": self.queue_length,
            "in_flight": self._total,
            "queued": self._queued,
            "in_flight_by_key": dict(self._in_flight),
            "queued_by_key": {k: sum(not w.future.done() for w in q) for k, q in self._queues.items()},
        }
