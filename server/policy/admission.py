"""One request's passage through admission: a reservation in the limit store, then a slot on its pool.

Both must be given back exactly once whatever happens: normal end, engine error, client disconnect
(which cancels the task, possibly in the middle of an `await`), or a streaming generator that is
dropped without ever running its `finally`. Hence:

* the store call in `admit` is shielded; if the caller is cancelled while it is in flight and it
  turns out to have admitted, the reservation is refunded in the background;
* a pool refusal after a successful reservation refunds the reservation (nothing ran);
* `Admission.finish` frees the pool slot synchronously, then settles in a shielded background task,
  so a cancelled caller cannot abort the settlement halfway;
* an `Admission` garbage-collected without `finish` frees its slot and charges its full reservation
  (usage unknown). The store's lease is the last line of defence (a crashed replica).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

from server.policy.errors import LimiterUnavailable
from server.policy.pool_gate import PoolGate, Ticket
from server.policy.store import Decision, LimitStore, Scope

log = logging.getLogger(__name__)

CHARGE_RESERVATION = 2**62  # "usage unknown": settle clamps this to the reserved amount


class Admission:
    """An admitted request. Call `await finish(used_tokens)` when its response has ended (idempotent)."""

    def __init__(self, admitter: Admitter, decision: Decision, gate: PoolGate, ticket: Ticket) -> None:
        self._finished = True  # until fully built, so __del__ of a half-built object does nothing
        self.request_id = decision.request_id
        self.reserved = decision.tokens
        self.decision = decision
        self._admitter = admitter
        self._gate = gate
        self._ticket = ticket
        self._loop = asyncio.get_running_loop()
        self._finished = False

    @property
    def headers(self) -> dict[str, str]:
        """x-ratelimit-* headers for the response."""
        return self.decision.headers()

    async def finish(self, used_tokens: int | None) -> None:
        """Free the slot and settle: `used_tokens` = prompt + all generated tokens (every choice);
        None when usage is unknown (charges the whole reservation); 0 when nothing reached the engine."""
        if self._finished:
            return
        self._finished = True
        self._gate.release(self._ticket)
        # The response is already complete: settle off the request's path (a task of its own, which
        # cancelling the caller cannot abort; Admitter.aclose waits for stragglers at shutdown).
        self._admitter.settle_soon(self.request_id, used_tokens)

    def __del__(self) -> None:
        if self._finished:
            return
        self._finished = True
        log.warning("admission %s dropped without finish(); releasing it", self.request_id)
        self._gate.release(self._ticket)
        with suppress(RuntimeError):  # loop closed: the store's lease reclaims the slot
            self._loop.call_soon_threadsafe(self._admitter.settle_in_background, self.request_id, None)


class Admitter:
    """The admission step of the request path: limit store (all replicas) + pool gates (this replica)."""

    def __init__(self, store: LimitStore, gates: Mapping[str, PoolGate]) -> None:
        self.store = store
        self.gates = dict(gates)
        self._background: set[asyncio.Task[Any]] = set()

    async def admit(self, scopes: list[Scope], *, pool: str, gate_key: str, request_id: str, tokens: int) -> Admission:
        """Reserve `tokens` (prompt + n * max_tokens) in every scope, then take a slot on `pool`.

        Raises RateLimited (429), LimiterUnavailable (503, fail closed) or PoolBusy (429/503).
        """
        gate = self.gates.get(pool)
        if gate is None:
            raise ValueError(f"unknown pool {pool!r}")
        if self.store.runs_inline:
            decision = await self.store.admit(scopes, request_id=request_id, tokens=tokens)
        else:
            pending = asyncio.ensure_future(self.store.admit(scopes, request_id=request_id, tokens=tokens))
            try:
                decision = await asyncio.shield(pending)
            except asyncio.CancelledError:
                pending.add_done_callback(self._undo_if_admitted)
                raise
        decision.raise_for_refusal()
        try:
            ticket = await gate.acquire(gate_key)
        except BaseException:
            await self.settle(request_id, 0)  # refused or cancelled before anything ran: refund all
            raise
        return Admission(self, decision, gate, ticket)

    def _undo_if_admitted(self, task: asyncio.Future[Decision]) -> None:
        if not task.cancelled() and task.exception() is None and task.result().allowed:
            self.settle_in_background(task.result().request_id, 0)

    def settle_in_background(self, request_id: str, used_tokens: int | None) -> asyncio.Task[None]:
        actual = CHARGE_RESERVATION if used_tokens is None else max(0, used_tokens)
        task = asyncio.get_running_loop().create_task(self._settle_now(request_id, actual))
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)
        return task

    def settle_soon(self, request_id: str, used_tokens: int | None) -> None:
        """Settle without waiting: inline for stores that never suspend, else in a background task."""
        actual = CHARGE_RESERVATION if used_tokens is None else max(0, used_tokens)
        if self.store.runs_inline:
            self.store.settle_now(request_id, actual)
            return
        self.settle_in_background(request_id, used_tokens)

    async def settle(self, request_id: str, used_tokens: int | None) -> None:
        """Settle in a task of its own and wait for it; cancelling the caller does not cancel the settle."""
        if self.store.runs_inline:
            self.settle_soon(request_id, used_tokens)
            return
        await asyncio.shield(self.settle_in_background(request_id, used_tokens))

    async def _settle_now(self, request_id: str, actual: int) -> None:
        try:
            await self.store.settle(request_id, actual)
        except LimiterUnavailable:
            # Nothing to retry against; the lease frees the global slot, the tokens stay charged.
            log.warning("could not settle %s: limit store unavailable", request_id)

    async def aclose(self) -> None:
        """Wait for background settlements (at shutdown, before closing the store)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
