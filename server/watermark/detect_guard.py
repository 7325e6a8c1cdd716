"""Who may ask the watermark detector, and how often: budgets per user and organization, probe suspensions.

Budgets are charged to the caller's user AND organization, never to the API key (a developer who mints
four keys gets no more than with one). Two scopes of the app's limit store (`server.policy.store`,
`memory://` or `redis://` by `admission.store_url`, so replicas share them), admitted together in one
atomic step, each call reserving one unit so the store's day counter counts calls:

    watermark-detect:user:<user id>   detect_requests_per_minute (sliding 60 s), detect_requests_per_day
    watermark-detect:org:<org id>     detect_org_requests_per_minute,            detect_org_requests_per_day

A refusal is a 429 in OpenAI's shape with Retry-After; an unreachable store raises the store's 503
(`limiter_unavailable`): detection fails closed rather than unmetered.

Probing (`probes.ProbeMemory`): a query that makes `detect_probe_threshold` near-identical queries within
the window is refused (429 `detection_suspended`), reported (`probes.report_probe`), and suspends the
caller's user, and its organization when more than one of its users took part (minted users, or a whole
team probing): refused on this replica for `detect_probe_cooldown_seconds`, and the day's budget of the
suspended scopes is spent in the shared store, so every other replica refuses them until the UTC day
ends. Suspensions held here are bounded (`MAX_SUSPENSIONS`, oldest dropped first); the spent day budget is
the part that does not depend on this replica's memory.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence

from server.audit.service import Actor
from server.audit.sink import AuditSink
from server.errors import TooManyAttempts
from server.identity.principal import Principal
from server.policy.limits import Limits
from server.policy.store import Decision, LimitStore, Scope
from server.watermark.probes import ProbeFinding, ProbeMemory, fingerprint, report_probe
from server.watermark.settings import WatermarkSettings

USER_SCOPE = "watermark-detect:user:"
ORG_SCOPE = "watermark-detect:org:"
MAX_SUSPENSIONS = 65_536


class DetectionSuspended(TooManyAttempts):
    default_code = "detection_suspended"


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class _Suspensions:
    """Scope name -> end of its suspension, at most `capacity` entries (expired ones go first)."""

    def __init__(self, capacity: int = MAX_SUSPENSIONS) -> None:
        self._until: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity

    def suspend(self, name: str, until: float, now: float) -> None:
        self._until.pop(name, None)
        self._until[name] = until
        if len(self._until) > self._capacity:
            for key in [k for k, t in self._until.items() if t <= now]:
                del self._until[key]
            while len(self._until) > self._capacity:
                self._until.popitem(last=False)

    def remaining(self, name: str, now: float) -> float:
        until = self._until.get(name)
        if until is None:
            return 0.0
        if until <= now:
            del self._until[name]
            return 0.0
        return until - now

    def __len__(self) -> int:
        return len(self._until)


class DetectGuard:
    """Admission of detection calls (`admit` / `release`) and the probe screen (`screen`).

    `clock` (seconds since the epoch) is for tests; by default the store uses its own clock (Redis's
    for every replica alike) and this replica's suspensions and probe memory use `time.time`.
    """

    def __init__(
        self,
        store: LimitStore,
        settings: WatermarkSettings,
        audit: AuditSink,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self._audit = audit
        self._clock = clock
        self.probes = ProbeMemory(
            settings.detect_probe_similarity, settings.detect_probe_threshold, settings.detect_probe_window_seconds
        )
        self.suspensions = _Suspensions()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else time.time()

    def _store_now(self) -> float | None:
        return self._clock() if self._clock is not None else None

    def _scopes(self, principal: Principal) -> list[Scope]:
        s = self.settings
        user = Limits(requests_per_minute=s.detect_requests_per_minute, tokens_per_day=s.detect_requests_per_day)
        org = Limits(requests_per_minute=s.detect_org_requests_per_minute, tokens_per_day=s.detect_org_requests_per_day)
        return [Scope(USER_SCOPE + principal.user_id, user), Scope(ORG_SCOPE + principal.org_id, org)]

    # -- budgets ---------------------------------------------------------------------------------------
    async def admit(self, principal: Principal) -> str:
        """Charge one call to the caller's user and organization; the reservation id to `release`."""
        now = self._now()
        for label, name in (("user", USER_SCOPE + principal.user_id), ("organization", ORG_SCOPE + principal.org_id)):
            wait = self.suspensions.remaining(name, now)
            if wait > 0:
                raise DetectionSuspended(
                    f"Watermark detection is suspended for this {label} for another {math.ceil(wait)} s after "
                    "queries that looked like probing of the watermark. Ask an administrator if this is a mistake.",
                    headers=_retry_after(wait),
                )
        request_id = f"wmdetect-{uuid.uuid4().hex}"
        decision = await self.store.admit(
            self._scopes(principal), request_id=request_id, tokens=1, now=self._store_now()
        )
        if not decision.allowed:
            raise self._refusal(decision)
        return request_id

    async def release(self, request_id: str) -> None:
        """Free the reservation's slot; the call stays counted."""
        await self.store.settle(request_id, 1)

    def _refusal(self, decision: Decision) -> TooManyAttempts:
        s = self.settings
        user = (decision.scope or "").startswith(USER_SCOPE)
        retry = decision.retry_after if decision.retry_after is not None else 60.0
        if decision.limit == "tokens_per_day":
            limit = s.detect_requests_per_day if user else s.detect_org_requests_per_day
            per, code = "UTC day", "insufficient_quota"
        else:
            limit = s.detect_requests_per_minute if user else s.detect_org_requests_per_minute
            per, code = "minute", "rate_limit_exceeded"
        return TooManyAttempts(
            f"Watermark detection is limited to {limit} requests per {per} per {'user' if user else 'organization'}, "
            f"whichever of its API keys is used; retry in {math.ceil(retry)} s.",
            code=code,
            headers=_retry_after(retry),
        )

    # -- probing ---------------------------------------------------------------------------------------
    async def screen(self, principal: Principal, token_ids: Sequence[int], actor: Actor, *, model: str) -> None:
        """Remember the query's fingerprint; refuse it (429) and suspend its senders if it completes a probe."""
        finding = await asyncio.to_thread(self._observe, principal, token_ids)
        if not finding.flagged:
            return
        suspended = ["user"] + (["organization"] if finding.users_in_org(principal.org_id) > 1 else [])
        await self._suspend(principal, suspended)
        report_probe(self._audit, actor, finding, model=model, suspended=suspended)
        cooldown = self.settings.detect_probe_cooldown_seconds
        raise DetectionSuspended(
            f"Watermark detection is suspended for this {' and '.join(suspended)}: "
            f"{finding.count} near-identical detection queries within "
            f"{self.settings.detect_probe_window_seconds:g} s look like probing of the watermark, and the event "
            "was recorded. The rest of today's detection budget is withdrawn. Ask an administrator if this is a "
            "mistake.",
            headers=_retry_after(max(cooldown, 1.0)),
        )

    def _observe(self, principal: Principal, token_ids: Sequence[int]) -> ProbeFinding:
        fp = fingerprint(token_ids, self.probes.keys)
        return self.probes.observe(principal.org_id, principal.user_id, fp, self._now())

    async def _suspend(self, principal: Principal, which: list[str]) -> None:
        s, now = self.settings, self._now()
        targets = [(USER_SCOPE + principal.user_id, s.detect_requests_per_day)]
        if "organization" in which:
            targets.append((ORG_SCOPE + principal.org_id, s.detect_org_requests_per_day))
        for name, day_budget in targets:
            self.suspensions.suspend(name, now + s.detect_probe_cooldown_seconds, now)
            # Spend the scope's day budget in the shared store: every replica refuses it until the UTC day ends.
            forfeit = f"wmdetect-forfeit-{uuid.uuid4().hex}"
            await self.store.admit(
                [Scope(name, Limits())], request_id=forfeit, tokens=day_budget, now=self._store_now()
            )
            await self.store.settle(forfeit, day_budget)
