"""Contract suite for LimitStore: every test runs against the memory and the Redis backend.

Time is injected (`now`) so window edges are tested to the microsecond; T0 is a UTC midnight so day
boundaries are easy to place.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from server.policy.limits import Limits
from server.policy.store import Scope

T0 = 1_780_000_000 - (1_780_000_000 % 86_400) + 3_600.0  # 01:00 UTC on some day


def key(rpm=None, tpm=None, tpd=None, conc=None, name="key:k1") -> list[Scope]:
    return [Scope(name, Limits(rpm, tpm, tpd, conc))]


def test_rpm_window_is_exact(backend):
    async def scenario():
        store = backend.store()
        scopes = key(rpm=3)
        for i, t in enumerate((0, 10, 20)):
            assert (await store.admit(scopes, request_id=f"r{i}", tokens=1, now=T0 + t)).allowed
        refused = await store.admit(scopes, request_id="r3", tokens=1, now=T0 + 30)
        assert not refused.allowed and refused.limit == "requests_per_minute" and refused.scope == "key:k1"
        assert refused.retry_after == pytest.approx(30.0)  # the entry at T0 leaves the window at T0 + 60
        assert refused.remaining_requests == 0
        assert not (await store.admit(scopes, request_id="r4", tokens=1, now=T0 + 59.999999)).allowed
        assert (await store.admit(scopes, request_id="r5", tokens=1, now=T0 + 60)).allowed
        assert not (await store.admit(scopes, request_id="r6", tokens=1, now=T0 + 60)).allowed
        await store.settle("r1", 0)  # settling does not give a request back: it happened
        assert not (await store.admit(scopes, request_id="r7", tokens=1, now=T0 + 69.9)).allowed
        assert (await store.admit(scopes, request_id="r8", tokens=1, now=T0 + 70)).allowed

    backend.run(scenario)


def test_tpm_reserve_settle_refund(backend):
    async def scenario():
        store = backend.store()
        scopes = key(tpm=100)
        first = await store.admit(scopes, request_id="a", tokens=60, now=T0)
        assert first.allowed and first.remaining_tokens == 40 and first.limit_tokens == 100
        refused = await store.admit(scopes, request_id="b", tokens=50, now=T0 + 1)
        assert not refused.allowed and refused.limit == "tokens_per_minute"
        assert refused.retry_after == pytest.approx(59.0) and not refused.never_fits
        await store.settle("a", 20)  # used 20 of 60: 40 come back at once
        assert (await store.usage("key:k1", now=T0 + 2))["tokens"] == 20
        assert (await store.admit(scopes, request_id="b", tokens=50, now=T0 + 2)).allowed
        await store.settle("b", 10_000)  # more than reserved: clamped, never charged above the reservation
        usage = await store.usage("key:k1", now=T0 + 3)
        assert usage["tokens"] == 70 and usage["tokens_today"] == 70 and usage["in_flight"] == 0
        assert (await store.usage("key:k1", now=T0 + 60))["tokens"] == 50  # "a" left the window
        assert (await store.usage("key:k1", now=T0 + 62))["tokens"] == 0

    backend.run(scenario)


def test_concurrent_admissions_never_overshoot(backend):
    """5 simultaneous 30-token reservations against 100 TPM: 3 fit, and no 60 s window ever holds more."""

    async def scenario():
        store = backend.store()
        scopes = key(tpm=100)
        rng = random.Random(7)
        charged: dict[str, tuple[float, int]] = {}  # request_id -> (admission time, tokens charged)
        open_ids: list[str] = []
        decisions = await asyncio.gather(
            *(store.admit(scopes, request_id=f"c{i}", tokens=30, now=T0) for i in range(5))
        )
        assert sum(d.allowed for d in decisions) == 3
        for d in decisions:
            if d.allowed:
                charged[d.request_id] = (T0, 30)
                open_ids.append(d.request_id)
        t, n = T0, 0
        while t < T0 + 240:
            t += rng.choice((0.5, 1, 3, 7))
            batch = []
            for _ in range(rng.randint(1, 6)):
                n += 1
                batch.append((f"n{n}", rng.randint(1, 45)))
            results = await asyncio.gather(*(store.admit(scopes, request_id=r, tokens=k, now=t) for r, k in batch))
            for (rid, tokens), d in zip(batch, results, strict=True):
                if d.allowed:
                    charged[rid] = (t, tokens)
                    open_ids.append(rid)
            rng.shuffle(open_ids)
            settles = [open_ids.pop() for _ in range(rng.randint(0, len(open_ids)))]
            actuals = {rid: rng.randint(0, charged[rid][1] + 10) for rid in settles}
            await asyncio.gather(*(store.settle(rid, a) for rid, a in actuals.items()))
            for rid, actual in actuals.items():
                charged[rid] = (charged[rid][0], min(actual, charged[rid][1]))
        assert len(charged) > 20
        for end, _ in charged.values():  # the fullest windows end at an admission time
            in_window = sum(tok for ts, tok in charged.values() if end - 60 < ts <= end)
            assert in_window <= 100
        # The store's own total agrees with the ledger.
        expected = sum(tok for ts, tok in charged.values() if t - 60 < ts <= t)
        assert (await store.usage("key:k1", now=t))["tokens"] == expected

    backend.run(scenario)


def test_decisions_match_an_exact_oracle(backend):
    """Sequential random traffic: every decision equals that of an exact sliding-window oracle (no early trips)."""

    async def scenario():
        store = backend.store()
        limits = Limits(requests_per_minute=12, tokens_per_minute=300)
        rng = random.Random(11)
        charged: dict[str, tuple[float, int]] = {}
        t = T0
        for i in range(150):
            t += rng.choice((0.25, 1, 2, 5))
            tokens = rng.randint(1, 80)
            live = [(ts, tok) for ts, tok in charged.values() if t - 60 < ts <= t]
            fits = len(live) + 1 <= 12 and sum(tok for _, tok in live) + tokens <= 300
            d = await store.admit([Scope("key:o", limits)], request_id=f"q{i}", tokens=tokens, now=t)
            assert d.allowed == fits, (i, d)
            if d.allowed:
                charged[f"q{i}"] = (t, tokens)
                actual = rng.randint(0, tokens)
                await store.settle(f"q{i}", actual)
                charged[f"q{i}"] = (t, actual)

    backend.run(scenario)


def test_reservation_larger_than_the_limit_never_fits(backend):
    async def scenario():
        store = backend.store()
        d = await store.admit(key(tpm=100), request_id="big", tokens=150, now=T0)
        assert not d.allowed and d.never_fits and d.limit == "tokens_per_minute"
        assert d.retry_after is None and "never fit" in d.message and "Retry-After" not in d.headers()
        d = await store.admit(key(tpm=1000, tpd=100), request_id="big2", tokens=150, now=T0)
        assert not d.allowed and d.never_fits and d.limit == "tokens_per_day"
        assert (await store.usage("key:k1", now=T0))["requests"] == 0
        assert (await store.admit(key(tpm=100), request_id="ok", tokens=100, now=T0)).allowed

    backend.run(scenario)


def test_tightest_of_key_user_org_applies(backend):
    async def scenario():
        store = backend.store()
        scopes = [
            Scope("key:k", Limits(requests_per_minute=10)),
            Scope("user:u", Limits(requests_per_minute=2)),
            Scope("org:o", Limits(requests_per_minute=100)),
        ]
        assert (await store.admit(scopes, request_id="1", tokens=0, now=T0)).allowed
        ok = await store.admit(scopes, request_id="2", tokens=0, now=T0)
        assert ok.allowed and ok.limit_requests == 2 and ok.remaining_requests == 0  # headers: tightest scope
        refused = await store.admit(scopes, request_id="3", tokens=0, now=T0)
        assert not refused.allowed and refused.scope == "user:u" and refused.limit == "requests_per_minute"
        # Another key of the same user is held back by the user scope too.
        other = [Scope("key:k2", Limits(requests_per_minute=10)), *scopes[1:]]
        assert (await store.admit(other, request_id="4", tokens=0, now=T0)).scope == "user:u"

    backend.run(scenario)


def test_failure_on_org_records_nothing_anywhere(backend):
    async def scenario():
        store = backend.store()
        org = Scope("org:o", Limits(tokens_per_minute=50))
        assert (await store.admit([Scope("key:other", Limits()), org], request_id="x", tokens=40, now=T0)).allowed
        scopes = [Scope("key:k", Limits(requests_per_minute=5, concurrent=3)), Scope("user:u", Limits()), org]
        d = await store.admit(scopes, request_id="y", tokens=20, now=T0 + 1)
        assert not d.allowed and d.scope == "org:o" and d.limit == "tokens_per_minute"
        for name in ("key:k", "user:u"):
            usage = await store.usage(name, now=T0 + 1)
            assert (usage["requests"], usage["tokens"], usage["tokens_today"], usage["in_flight"]) == (0, 0, 0, 0)
        assert (await store.usage("org:o", now=T0 + 1))["tokens"] == 40
        await store.settle("y", 0)  # settling a refused request is a harmless no-op
        assert (await store.usage("org:o", now=T0 + 1))["tokens"] == 40

    backend.run(scenario)


def test_concurrency_limit_and_release(backend):
    async def scenario():
        store = backend.store()
        scopes = key(conc=2, tpm=1000)
        assert (await store.admit(scopes, request_id="a", tokens=100, now=T0)).allowed
        assert (await store.admit(scopes, request_id="b", tokens=100, now=T0)).allowed
        d = await store.admit(scopes, request_id="c", tokens=100, now=T0)
        assert not d.allowed and d.limit == "concurrent" and d.retry_after is None
        assert await store.in_flight("key:k1", now=T0) == 2
        await store.settle("a", 50)
        assert (await store.admit(scopes, request_id="c", tokens=100, now=T0 + 1)).allowed
        await store.release("b", refund=True)  # failed before generating: nothing charged
        await store.release("c")  # engine ran, usage unknown: the whole reservation stays charged
        usage = await store.usage("key:k1", now=T0 + 2)
        assert usage["in_flight"] == 0 and usage["tokens"] == 150 and usage["requests"] == 3

    backend.run(scenario)


def test_settle_and_admit_are_idempotent(backend):
    async def scenario():
        store = backend.store()
        scopes = key(tpm=100, conc=5)
        assert (await store.admit(scopes, request_id="a", tokens=60, now=T0)).allowed
        again = await store.admit(scopes, request_id="a", tokens=60, now=T0)  # a retried call: not charged twice
        assert again.allowed
        assert (await store.usage("key:k1", now=T0))["tokens"] == 60
        await store.settle("a", 10)
        await store.settle("a", 0)
        await store.settle("never-admitted", 5)
        usage = await store.usage("key:k1", now=T0)
        assert usage["tokens"] == 10 and usage["in_flight"] == 0 and usage["tokens_today"] == 10

    backend.run(scenario)


def test_lease_expiry_reclaims_the_slot_but_keeps_tokens(backend):
    async def scenario():
        store = backend.store(lease_seconds=5)
        scopes = key(conc=1, tpm=100)
        assert (await store.admit(scopes, request_id="crashed", tokens=40, now=T0)).allowed
        assert not (await store.admit(scopes, request_id="b", tokens=10, now=T0 + 4.9)).allowed
        assert await store.in_flight("key:k1", now=T0 + 5) == 0
        assert (await store.admit(scopes, request_id="b", tokens=10, now=T0 + 5)).allowed
        assert (await store.usage("key:k1", now=T0 + 5))["tokens"] == 50  # leaked tokens stay counted
        await store.settle("crashed", 0)  # a late settle still refunds, and does not free b's slot
        usage = await store.usage("key:k1", now=T0 + 6)
        assert usage["tokens"] == 10 and usage["in_flight"] == 1

    backend.run(scenario)


def test_day_quota_is_per_utc_day(backend):
    async def scenario():
        store = backend.store()
        midnight = T0 - 3_600 + 86_400
        scopes = key(tpd=100)
        assert (await store.admit(scopes, request_id="a", tokens=60, now=midnight - 30)).allowed
        d = await store.admit(scopes, request_id="b", tokens=50, now=midnight - 20)
        assert not d.allowed and d.limit == "tokens_per_day" and d.retry_after == pytest.approx(20)
        assert d.error().code == "insufficient_quota" and d.error().status_code == 429
        assert (await store.admit(scopes, request_id="b", tokens=50, now=midnight)).allowed
        await store.settle("a", 0)  # yesterday's refund does not touch today's counter
        assert (await store.usage("key:k1", now=midnight + 1))["tokens_today"] == 50

    backend.run(scenario)
