"""Limits values, role defaults, scopes for a principal, decisions' headers and errors, and the memory sweep."""

from __future__ import annotations

import asyncio

import pytest

from server.identity.principal import Principal
from server.policy.limits import DEFAULT_LIMITS, Limits, role_limits
from server.policy.memory_store import MemoryLimitStore
from server.policy.scopes import scopes_for
from server.policy.store import Scope, make_store


def test_from_dict_parses_and_validates():
    assert Limits.from_dict({"rpm": 10, "tpm": 1000, "tpd": None, "concurrent": 2}) == Limits(10, 1000, None, 2)
    assert Limits.from_dict({}) == Limits() and Limits.from_dict(None).is_unlimited
    for bad in ({"rpm": -1}, {"tpm": 1.5}, {"concurrent": True}, {"tpm": "100"}, {"tmp": 100}):
        with pytest.raises(ValueError):
            Limits.from_dict(bad)
    assert Limits(1, 2, 3, 4).to_dict() == {"rpm": 1, "tpm": 2, "tpd": 3, "concurrent": 4}


def test_tightest_loosest_and_scaled():
    a, b = Limits(10, None, 500, 4), Limits(20, 100, None, 2)
    assert a.tightest(b) == Limits(10, 100, 500, 2)
    assert a.loosest(b) == Limits(20, None, None, 4)
    assert Limits(10, 1000, 5, 3).scaled(0.25) == Limits(2, 250, 1, 1)  # floor, never below 1
    assert Limits(0, None, 7, 1).scaled(0.1) == Limits(0, None, 1, 1)  # 0 and None are kept
    for factor in (0, -1, 1.5):
        with pytest.raises(ValueError):
            Limits().scaled(factor)


def test_role_defaults():
    assert set(DEFAULT_LIMITS) == {"owner", "admin", "operator", "developer", "auditor", "client"}
    assert DEFAULT_LIMITS["client"] == Limits(60, 60_000, 1_000_000, 8)
    assert role_limits(["client", "admin"]) == DEFAULT_LIMITS["admin"]
    assert role_limits(["some-custom-role"]) == DEFAULT_LIMITS["client"]
    assert all(not limits.is_unlimited for limits in DEFAULT_LIMITS.values())


def principal(**overrides) -> Principal:
    values = dict(
        user_id="u1",
        org_id="o1",
        roles=("developer",),
        permissions=frozenset({"inference"}),
        via="api_key",
        scopes=(),
        amr=(),
        auth_time=0,
        api_key_id="k1",
        limits={"rpm": 5},
    )
    values.update(overrides)
    return Principal(**values)


def test_scopes_for_a_principal():
    key, user, org = scopes_for(principal(), org_limits=Limits(tokens_per_day=10**7))
    assert key == Scope("key:k1", Limits(requests_per_minute=5))
    assert user == Scope("user:u1", DEFAULT_LIMITS["developer"])
    assert org == Scope("org:o1", Limits(tokens_per_day=10**7))
    throttled = scopes_for(principal(), factor=0.5)[0]
    assert throttled.limits == DEFAULT_LIMITS["developer"].tightest(Limits(requests_per_minute=5)).scaled(0.5)
    token_caller = scopes_for(principal(via="token", api_key_id=None), factor=0.5)
    assert [s.name for s in token_caller] == ["user:u1", "org:o1"]
    assert token_caller[0].limits == DEFAULT_LIMITS["developer"].scaled(0.5)
    with pytest.raises(ValueError):
        scopes_for(principal(limits={"rpm": "lots"}))


def test_make_store_by_url():
    assert isinstance(make_store("memory://"), MemoryLimitStore)
    with pytest.raises(ValueError):
        make_store("postgresql://x")


def test_refusal_headers_and_error():
    async def scenario():
        store = MemoryLimitStore()
        scopes = [Scope("key:k", Limits(requests_per_minute=1, tokens_per_minute=100))]
        ok = await store.admit(scopes, request_id="a", tokens=40, now=1000.0)
        assert ok.headers() == {
            "x-ratelimit-limit-requests": "1",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "60.000s",
            "x-ratelimit-limit-tokens": "100",
            "x-ratelimit-remaining-tokens": "60",
            "x-ratelimit-reset-tokens": "60.000s",
        }
        ok.raise_for_refusal()
        refused = await store.admit(scopes, request_id="b", tokens=10, now=1000.5)
        error = refused.error()
        assert error.status_code == 429 and error.code == "rate_limit_exceeded"
        assert error.headers["Retry-After"] == "60"  # 59.5 s, rounded up
        assert "key:k" in error.message

    asyncio.run(scenario())


def test_memory_store_forgets_idle_scopes():
    async def scenario():
        store = MemoryLimitStore(lease_seconds=600)
        for i in range(100):
            await store.admit([Scope(f"key:{i}", Limits())], request_id=f"r{i}", tokens=0, now=1000.0)
        assert store.scope_count == 100
        # Out of the window, but the unsettled leases keep the scopes (their slots are still held).
        await store.admit([Scope("key:x", Limits())], request_id="x", tokens=0, now=1061.0)
        assert store.scope_count == 101
        # Leases expired and abandoned reservations are older than lease + window + 60 s: all forgotten.
        await store.admit([Scope("key:y", Limits())], request_id="y", tokens=0, now=1800.0)
        assert store.scope_count == 1 and len(store._reservations) == 1

    asyncio.run(scenario())
