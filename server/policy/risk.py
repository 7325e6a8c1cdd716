"""Adaptive limits: risk signals that scale a caller's limits down.

Signals (each a factor in (0, 1], multiplied together):
- a new key (younger than `new_key_age_seconds`): `new_key_factor`;
- recent failed logins from the key owner's email or from the client's address: `auth_failure_factor`;
- a risk score per key in [0, 1] (the hook the abuse-detection work feeds): `1 - score`, floored at 0.05.

Failed logins come from the lockout table, read by a background poll every few seconds (never per request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from server.identity.models import AuthFailure
from server.identity.principal import Principal
from server.settings import AdmissionSettings
from server.storage.db import Database

log = logging.getLogger(__name__)

MIN_FACTOR = 0.05


@dataclass(frozen=True)
class Assessment:
    factor: float
    reasons: tuple[str, ...] = field(default=())


class RiskSignals:
    def __init__(self, db: Database, settings: AdmissionSettings, poll_seconds: float = 5.0) -> None:
        self._db = db
        self._settings = settings
        self._poll = poll_seconds
        self._failing: frozenset[str] = frozenset()
        self._scores: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def set_score(self, api_key_id: str, score: float) -> None:
        """The abuse-detection hook: 0 = no risk (full limits) … 1 = maximal risk (limits × 0.05)."""
        if not 0.0 <= score <= 1.0:
            raise ValueError("a risk score is in [0, 1]")
        if score == 0.0:
            self._scores.pop(api_key_id, None)
        else:
            self._scores[api_key_id] = score

    def score(self, api_key_id: str | None) -> float:
        return self._scores.get(api_key_id, 0.0) if api_key_id else 0.0

    def assess(self, principal: Principal, client_addr: str | None) -> Assessment:
        factor, reasons = 1.0, []
        s = self._settings
        if principal.key_created_at is not None and time.time() - principal.key_created_at < s.new_key_age_seconds:
            factor *= s.new_key_factor
            reasons.append("new_key")
        subjects = {f"addr:{client_addr}"} if client_addr else set()
        if principal.email:
            subjects.add(f"email:{principal.email}")
        if subjects & self._failing:
            factor *= s.auth_failure_factor
            reasons.append("recent_auth_failures")
        score = self.score(principal.api_key_id)
        if score > 0:
            factor *= 1.0 - score
            reasons.append(f"risk_score={score:.2f}")
        # Rounded so that e.g. 10 × (1 - 0.8) scales to 2, not to floor(1.999…) = 1.
        return Assessment(max(MIN_FACTOR, round(factor, 6)) if reasons else 1.0, tuple(reasons))

    def refresh(self) -> None:
        since = datetime.now(UTC) - timedelta(seconds=self._settings.auth_failure_window_seconds)
        with self._db.session() as session:
            rows = session.scalars(
                select(AuthFailure.subject).where(AuthFailure.last_failure_at >= since, AuthFailure.failures > 0)
            )
            self._failing = frozenset(rows)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as exc:
                log.warning("risk signal refresh failed: %s", exc)
            await asyncio.sleep(self._poll)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
