"""`python -m server limits show|set SCOPE`: the limits of a key, user or organization from the command line.

These do what `GET/PUT /v1/admin/limits/{scope}` do, through the same functions (`server.policy.overrides`):
on the database directly (no running server needed), audited as the system actor, picked up by every
replica within a second. `set` replaces the scope's limits, as the API's PUT does: a limit not given is
removed from the scope (the other scopes and role defaults still apply).

Usage counters live in the limit store. A Redis store is shared, so `show` reads them there; the in-memory
store belongs to each server process and the command line cannot see it (ask the admin API instead).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from server.audit.service import Actor
from server.identity.cli import _emit, _open
from server.policy.errors import LimiterUnavailable
from server.policy.limits import SHORT_NAMES
from server.policy.overrides import compact_limits, read_limits, write_limits
from server.policy.store import SHARED_STORE_SCHEMES, make_store
from server.settings import Settings


def _describe(limits: dict[str, Any]) -> str:
    return " ".join(f"{name}={limits[name]}" for name in SHORT_NAMES if name in limits) or "none set"


def _usage(settings: Settings, scope: str) -> dict[str, Any] | None:
    """The scope's usage from a shared (Redis) limit store; None for a per-process store or an unreachable one."""
    adm = settings.admission
    if not adm.store_url.startswith(SHARED_STORE_SCHEMES):
        return None

    async def read() -> dict[str, Any]:
        store = make_store(adm.store_url, lease_seconds=adm.lease_seconds)
        try:
            return dict(await store.usage(scope))
        finally:
            await store.aclose()

    try:
        return asyncio.run(read())
    except LimiterUnavailable:
        print("warning: the limit store is unreachable; showing limits only", file=sys.stderr)
        return None


def show(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (db, _):
        limits = read_limits(db, args.scope)
    usage = _usage(settings, args.scope)
    if usage is not None:
        counters = " ".join(f"{k}={usage[k]}" for k in ("requests", "tokens", "tokens_today", "in_flight"))
        usage_text = f"usage: {counters}"
    else:
        usage_text = f"usage: not available here ({settings.admission.store_url} store); see GET /v1/admin/limits"
    out = {"object": "limits", "scope": args.scope, "limits": limits, "usage": usage}
    _emit(args, out, f"{args.scope}: {_describe(limits)}\n{usage_text}")
    return 0


def set_limits(settings: Settings, args: argparse.Namespace) -> int:
    limits = compact_limits({name: getattr(args, name) for name in SHORT_NAMES})
    with _open(settings) as (db, _):
        before = write_limits(db, args.scope, limits, Actor.system(), changed_by="cli", reason=args.reason)
    out = {"object": "limits", "scope": args.scope, "limits": limits, "before": before}
    _emit(args, out, f"{args.scope}: {_describe(limits)} (was: {_describe(before)})")
    return 0
