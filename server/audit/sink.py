"""Buffered audit writing for request-path decisions (authentication, authorization).

Admin changes write their event in the change's own transaction (server.audit.service.record). Decisions
taken on every request are queued here and inserted in batches by a background task, so auditing an
inference call costs a list append, not a database round trip. The queue is bounded: past the bound the
caller waits for a flush (backpressure), events are never dropped.

Failed authentications are not queued one by one: anyone can cause them, so they are tallied
(`server.audit.failures`) and written as at most `failure_max_rows + 2` rows per `failure_interval` seconds.
Those rows are the installation's security events: after they are written they pass through
`_publish_security_events`, the single place where a security-event stream (a later piece of work)
subscribes (`subscribe_security_events`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert

from server.audit.failures import FailureTally, truncate
from server.audit.models import AuditEvent
from server.audit.service import Actor
from server.storage.db import Database

log = logging.getLogger(__name__)

PATH_CHARS = 256
SecurityEventSubscriber = Callable[[list[dict[str, Any]]], None]


class AuditSink:
    def __init__(
        self,
        db: Database,
        flush_interval: float = 0.2,
        max_pending: int = 5000,
        *,
        failure_interval: float = 60.0,
        failure_max_rows: int = 100,
    ) -> None:
        self._db = db
        self._interval = flush_interval
        self._max = max_pending
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        # One flush at a time: a flush returns only once everything queued before it is in the database,
        # even when the background flush had already taken the batch (readers flush, then query).
        self._flush_lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self.failures = FailureTally(failure_max_rows)
        self.failure_interval = failure_interval
        self._failures_flushed_at = time.monotonic()
        self._subscribers: list[SecurityEventSubscriber] = []

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
        if "path" in details:
            details["path"] = truncate(details["path"], PATH_CHARS)
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
            "peer_addr": actor.peer_addr,
            "request_id": actor.request_id,
            "details": details,
        }
        with self._lock:
            self._pending.append(event)
            full = len(self._pending) >= self._max
        if full:
            self.flush()

    def failure(self, actor: Actor, action: str, reason: str, **samples: Any) -> None:
        """Count a failed authentication (written aggregated, see the module docstring)."""
        self.failures.add(actor, action, reason, **samples)

    def flush(self, *, failures: bool = False) -> int:
        """Write the queued events; with `failures`, or once the failure interval has passed, the tallies too."""
        with self._flush_lock:
            return self._flush(failures)

    def _flush(self, failures: bool) -> int:
        rows: list[dict[str, Any]] = []
        if failures or time.monotonic() - self._failures_flushed_at >= self.failure_interval:
            self._failures_flushed_at = time.monotonic()
            rows = self.failures.drain()
        with self._lock:
            batch, self._pending = self._pending, []
        batch += rows
        if batch:
            try:
                with self._db.session() as session:
                    session.execute(insert(AuditEvent), batch)
            except Exception:
                log.exception("audit flush failed; %d events re-queued", len(batch))
                with self._lock:
                    self._pending[:0] = batch
                raise
        if rows:
            self._publish_security_events(rows)
        return len(batch)

    def subscribe_security_events(self, subscriber: SecurityEventSubscriber) -> None:
        self._subscribers.append(subscriber)

    def _publish_security_events(self, rows: list[dict[str, Any]]) -> None:
        """The one hook for a security-event stream: every aggregated failure row, after it is in the audit."""
        for subscriber in self._subscribers:
            try:
                subscriber(rows)
            except Exception:
                log.exception("security event subscriber failed")

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
        await asyncio.to_thread(self.flush, failures=True)
