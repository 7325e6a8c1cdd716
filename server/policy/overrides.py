"""The limits set on one scope, read and changed the same way by the admin API and the command line.

A scope is `key:<id>`, `user:<id>` or `org:<id>`. A key keeps its limits on its own row; the row is cached
with the key record, so a change bumps the credentials counter and every replica's authenticator reloads
it. Users and organizations keep theirs in `limit_overrides`, which every gatekeeper polls. A change and
its audit event are one transaction: there is no change without its record, nor a record of a change
that did not happen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.orm import Session

from server.audit.service import Actor, record
from server.errors import InvalidRequest, NotFound
from server.identity.apikeys import bump_credentials
from server.identity.models import ApiKey, Organization, User
from server.policy.limits import Limits
from server.policy.models import LimitOverride
from server.storage.db import Database

_MODELS = {"key": ApiKey, "user": User, "org": Organization}
OrgFilter = Callable[[str | None], bool]
# Raises (e.g. GrantRefused) when the caller may not change this scope: called with (session, kind, row).
ChangeGuard = Callable[[Session, str, Any], None]


def _any_org(org_id: str | None) -> bool:
    """The operator's command line sees every organization."""
    return True


def _resolve(session: Session, scope: str, may_access_org: OrgFilter) -> tuple[str, str, Any]:
    """(kind, org id, row) of a scope; a scope in an organization the caller may not see is as missing (404)."""
    kind, _, ident = scope.partition(":")
    model = _MODELS.get(kind)
    if model is None or not ident:
        raise InvalidRequest("A scope is key:<id>, user:<id> or org:<id>.", param="scope")
    row = session.get(model, ident)
    org_id = getattr(row, "id" if kind == "org" else "org_id", None)
    if row is None or org_id is None or not may_access_org(org_id):
        raise NotFound(f"Scope {scope!r} not found.")
    return kind, str(org_id), row


def _current(session: Session, scope: str, kind: str, row: Any) -> dict[str, Any]:
    if kind == "key":
        return dict(row.limits or {})
    override = session.get(LimitOverride, scope)
    return dict(override.limits) if override else {}


def compact_limits(values: Mapping[str, int | None]) -> dict[str, int]:
    """The limits that are set (None: no limit at this scope), refused (400) unless `Limits` accepts them."""
    compact = {name: value for name, value in values.items() if value is not None}
    try:
        Limits.from_dict(compact)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="limits") from None
    return compact


def read_limits(db: Database, scope: str, may_access_org: OrgFilter = _any_org) -> dict[str, Any]:
    """The limits configured on a scope (not its usage: that lives in the limit store)."""
    with db.session() as session:
        kind, _, row = _resolve(session, scope, may_access_org)
        return _current(session, scope, kind, row)


def write_limits(
    db: Database,
    scope: str,
    limits: dict[str, int],
    actor: Actor,
    *,
    changed_by: str | None,
    reason: str = "",
    may_access_org: OrgFilter = _any_org,
    guard: ChangeGuard | None = None,
) -> dict[str, Any]:
    """Replace a scope's limits with `limits` (from `compact_limits`), audited as "limits.set"; returns the
    limits it had before. Replicas pick the change up on their next poll (within a second)."""
    with db.session() as session:
        kind, org_id, row = _resolve(session, scope, may_access_org)
        if guard is not None:
            guard(session, kind, row)
        before = _current(session, scope, kind, row)
        if kind == "key":
            row.limits = limits
            bump_credentials(session)  # cached key records carry their limits
        else:
            override = session.get(LimitOverride, scope)
            if override is None:
                override = LimitOverride(scope=scope, org_id=org_id)
                session.add(override)
            override.limits, override.changed_by = limits, changed_by
        record(
            session,
            actor,
            "limits.set",
            "success",
            target_type="scope",
            target_id=scope,
            org_id=org_id,
            before=before,
            after=limits,
            reason=reason,
        )
    return before
