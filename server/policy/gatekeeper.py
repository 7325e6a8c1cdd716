"""The admission step of an inference request, as the endpoints call it.

`Gatekeeper.admit` turns a caller and a token reservation into an `Admission` (or a 429/503):
scopes (key, user, org, with operator overrides), adaptive scaling from risk signals, the limit store
(every replica), the pool gate (this replica). Every refusal is an audit event with its reason.
If the limit store is unreachable the request fails closed (503), except for keys the operator listed in
`admission.fail_open_keys`, which still take a pool slot but are not metered until the store returns.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import select

from server.audit.sink import AuditSink
from server.identity.principal import Principal
from server.policy.admission import Admission, Admitter
from server.policy.errors import LimiterUnavailable, PoolBusy, RateLimited
from server.policy.limits import Limits
from server.policy.models import LimitOverride
from server.policy.pool_gate import PoolGate, Ticket
from server.policy.risk import RiskSignals
from server.policy.scopes import scopes_for
from server.settings import AdmissionSettings
from server.storage.db import Database

log = logging.getLogger(__name__)


class FailOpenAdmission:
    """A pool slot without a reservation: for listed keys while the limit store is down."""

    headers: dict[str, str] = {}

    def __init__(self, gate: PoolGate, ticket: Ticket) -> None:
        self._gate, self._ticket = gate, ticket

    async def finish(self, used_tokens: int | None) -> None:
        self._gate.release(self._ticket)


class Gatekeeper:
    def __init__(
        self,
        admitter: Admitter,
        settings: AdmissionSettings,
        risk: RiskSignals,
        audit: AuditSink,
        db: Database,
        poll_seconds: float = 1.0,
    ) -> None:
        self.admitter = admitter
        self.settings = settings
        self.risk = risk
        self._audit = audit
        self._db = db
        self._poll = poll_seconds
        self.overrides: dict[str, Limits] = {}
        self._task: asyncio.Task[None] | None = None

    async def admit(
        self, principal: Principal, *, pool: str, request_id: str, tokens: int, client_addr: str | None
    ) -> Admission | FailOpenAdmission:
        assessment = self.risk.assess(principal, client_addr)
        scopes = scopes_for(
            principal,
            user_limits=self.overrides.get(f"user:{principal.user_id}"),
            org_limits=self.overrides.get(f"org:{principal.org_id}"),
            factor=assessment.factor,
        )
        gate_key = principal.api_key_id or f"user:{principal.user_id}"
        try:
            return await self.admitter.admit(scopes, pool=pool, gate_key=gate_key, request_id=request_id, tokens=tokens)
        except LimiterUnavailable:
            self._refused(principal, client_addr, request_id, "limiter_unavailable", assessment.reasons, tokens)
            if principal.api_key_id in self.settings.fail_open_keys:
                log.warning("limit store down: key %s admitted unmetered (fail_open_keys)", principal.api_key_id)
                gate = self.admitter.gates[pool]
                return FailOpenAdmission(gate, await gate.acquire(gate_key))
            raise
        except (RateLimited, PoolBusy) as exc:
            self._refused(
                principal,
                client_addr,
                request_id,
                exc.code or "refused",
                assessment.reasons,
                tokens,
                message=exc.message,
            )
            raise

    def _refused(
        self,
        principal: Principal,
        client_addr: str | None,
        request_id: str,
        code: str,
        reasons: tuple[str, ...],
        tokens: int,
        message: str = "",
    ) -> None:
        self._audit.submit(
            principal.actor(client_addr, request_id),
            "admission",
            "denied",
            code=code,
            adaptive=list(reasons),
            tokens=tokens,
            reason=message[:300],
        )

    # -- operator overrides (user and org limits), shared by replicas through the database ---------------
    def refresh(self) -> None:
        with self._db.session() as session:
            rows = {r.scope: Limits.from_dict(r.limits) for r in session.scalars(select(LimitOverride))}
        self.overrides = rows

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as exc:
                log.warning("limit overrides refresh failed: %s", exc)
            await asyncio.sleep(self._poll)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.admitter.aclose()
        await self.admitter.store.aclose()

    def apply_pool_state(self, pool: str, state: str) -> None:
        """Called when an operator drains, isolates or resumes a pool (on every replica)."""
        gate = self.admitter.gates[pool]
        {"draining": gate.drain, "isolated": gate.isolate, "serving": gate.resume}[state]()

    def snapshot(self) -> dict[str, Any]:
        return {name: gate.snapshot() for name, gate in self.admitter.gates.items()}
