"""Buffered audit writing for request-path decisions (authentication, authorization).

Admin changes write their event in the change's own transaction (server.audit.service.record). Decisions
taken on every request are queued here and inserted in batches by a background task, so auditing an
inference call costs a list append, not a database round trip. The queue is bounded: past the bound the
caller waits for a flush (backpressure), events are never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert

from server.audit.models import AuditEvent
from server.audit.service import Actor
from server.storage.db import Database

log = logging.getLogger(__name__)


class AuditSink:
    def __init__(self, db: Database, flush_interval: float = 0.2, max_pending: int = 5000) -> None:
        self._db = db
        self._interval = flush_interval
        self._max = max_pending
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    def submit(
        self,
        actor: Actor,
        action: str,
        outcome: str,
        *,
        target_type: str | None = None,
        target_id: str | None = None,
        **details: Any,
    ) -> None:
        event = {
            "ts": datetime.now(UTC),
            "org_id": actor.org_id,
            "actor_type": actor.type,
            "actor_id": actor.id,
            "action": action,
            "outcome": outcome,
            "target_type": target_type,
            "target_id": target_id,
            "client_addr": actor.client_addr,
            "request_id": actor.request_id,
            "details": details,
        }
        with self._lock:
            self._pending.append(event)
            full = len(self._pending) >= self._max
        if full:
            self.flush()

    def flush(self) -> int:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            try:
                with self._db.session() as session:
                    session.execute(insert(AuditEvent), batch)
            except Exception:
                log.exception("audit flush failed; %d events re-queued", len(batch))
                with self._lock:
                    self._pending[:0] = batch
                raise
        return len(batch)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            with contextlib.suppress(Exception):  # logged in flush; the batch is retried next tick
                await asyncio.to_thread(self.flush)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.to_thread(self.flush)
