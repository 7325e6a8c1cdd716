"""Which scopes a caller's request is charged to: its API key, its user, its organization.

All three are checked atomically by the store, so the tightest limit in any of them applies without
merging numbers here. The key scope carries only the key's own `limits` (it can tighten, never loosen),
the user scope the role defaults (shared by all the user's keys), the org scope the org's quota.
"""

from __future__ import annotations

from collections.abc import Mapping

from server.identity.principal import Principal
from server.policy.limits import Limits, role_limits
from server.policy.store import Scope


def scopes_for(
    principal: Principal,
    *,
    user_limits: Limits | None = None,
    org_limits: Limits | None = None,
    factor: float = 1.0,
    defaults: Mapping[str, Limits] | None = None,
) -> list[Scope]:
    """Scopes for one request, most specific first (so a refusal names the key before the org).

    `user_limits` overrides the role defaults for this user; `org_limits` None means the org is unlimited.
    `factor` < 1 throttles the caller adaptively (risk signals): the caller's effective limits (key
    and user combined) are scaled and charged on the most specific scope, leaving the org untouched.
    Raises ValueError if the key's stored limits are malformed (fail closed rather than unlimited).
    """
    user = user_limits if user_limits is not None else role_limits(principal.roles, defaults)
    key = Limits.from_dict(principal.limits) if principal.api_key_id is not None else None
    if factor < 1.0:
        if key is not None:
            key = key.tightest(user).scaled(factor)
        else:
            user = user.scaled(factor)
    scopes: list[Scope] = []
    if key is not None:
        scopes.append(Scope(f"key:{principal.api_key_id}", key))
    scopes.append(Scope(f"user:{principal.user_id}", user))
    scopes.append(Scope(f"org:{principal.org_id}", org_limits if org_limits is not None else Limits()))
    return scopes
