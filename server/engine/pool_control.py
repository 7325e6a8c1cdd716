"""Operator control of pools (drain, isolate, resume), persisted so that every replica obeys it.

A change is written with its audit event in one transaction; each replica polls the `pool_states` table
(a few rows) twice a second and applies what it reads to its local admission gates through `on_change`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import select

from server.audit.service import Actor, record
from server.engine.models import PoolState
from server.errors import InvalidRequest, NotFound
from server.storage.db import Database

log = logging.getLogger(__name__)

State = Literal["serving", "draining", "isolated"]
STATES: tuple[State, ...] = ("serving", "draining", "isolated")


class PoolControl:
    def __init__(
        self, db: Database, pool_names: list[str], on_change: Callable[[str, State], None], poll_seconds: float = 0.5
    ) -> None:
        self._db = db
        self._names = list(pool_names)
        self._on_change = on_change
        self._poll = poll_seconds
        self.states: dict[str, State] = dict.fromkeys(self._names, "serving")
        self._task: asyncio.Task[None] | None = None

    def refresh(self) -> None:
        with self._db.session() as session:
            rows = {r.name: r.state for r in session.scalars(select(PoolState))}
        for name in self._names:
            state: State = rows.get(name, "serving")  # type: ignore[assignment]
            if state != self.states.get(name):
                log.warning("pool %s is now %s", name, state)
                self.states[name] = state
                self._on_change(name, state)

    def set_state(self, name: str, state: str, actor: Actor, reason: str = "") -> None:
        if name not in self._names:
            raise NotFound(f"Pool {name!r} is not declared on this server.", param="pool")
        if state not in STATES:
            raise InvalidRequest(f"Unknown pool state {state!r}; use one of {', '.join(STATES)}.")
        with self._db.session() as session:
            row = session.get(PoolState, name)
            before = row.state if row else "serving"
            if row is None:
                row = PoolState(name=name)
                session.add(row)
            row.state, row.reason, row.changed_by, row.changed_at = state, reason[:500], actor.id, datetime.now(UTC)
            record(
                session,
                actor,
                f"pools.{state}",
                "success",
                target_type="pool",
                target_id=name,
                before=before,
                reason=reason[:500],
            )
        self.refresh()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as exc:
                log.warning("pool state poll failed: %s", exc)
            await asyncio.sleep(self._poll)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
