"""Permissions, built-in roles and key scopes. Deny by default: what is not granted here is refused.

A caller's effective permissions are the union of its roles' permissions, narrowed by the scopes of the
credential it used (an API key's scopes, or a token's): `effective = role_permissions ∩ expand(scopes)`.
"""

from __future__ import annotations

from collections.abc import Iterable

# Every permission a route can require. Named strings; "public" marks a route that needs no credential.
PUBLIC = "public"
PERMISSIONS: dict[str, str] = {
    "inference": "call the completion endpoints",
    "models:read": "list served models",
    "models:write": "import, sign and evaluate model versions",
    "models:promote": "promote or roll back model versions (step-up)",
    "pools:read": "read pool state and GPU telemetry",
    "pools:write": "drain or isolate pools (step-up)",
    "finetune": "upload fine-tuning data",
    "watermark:detect": "call the watermark detection API",
    "watermark:read": "read watermark key ids, parameters and exemptions (never key material)",
    "watermark:admin": "manage watermark keys and exemptions (step-up)",
    "orgs:read": "read organizations",
    "orgs:write": "create and change organizations (step-up)",
    "users:read": "read users of the caller's organization",
    "users:write": "create and change users of the caller's organization",
    "roles:read": "read roles",
    "roles:write": "create roles and change role assignments (step-up)",
    "keys:read": "read API keys of the caller's organization",
    "keys:write": "create, rotate and revoke the caller's own API keys",
    "keys:admin": "create, rotate and revoke other users' API keys (rotation for others: step-up)",
    "signing-keys:read": "read JWT signing key metadata",
    "signing-keys:rotate": "rotate the JWT signing key (step-up)",
    "policy:write": "change limits and policies (step-up)",
    "audit:read": "read audit events of the caller's organization",
    "usage:read": "read usage of the caller's organization",
    "metrics:read": "scrape /metrics",
    "self": "read one's own identity and manage one's own MFA",
}

_ADMIN = set(PERMISSIONS) - {"orgs:write"}

BUILTIN_ROLES: dict[str, tuple[str, frozenset[str]]] = {
    "owner": ("the installation's owner: every permission, across organizations", frozenset(PERMISSIONS)),
    "admin": ("administers one organization", frozenset(_ADMIN)),
    "operator": (
        "runs models and pools",
        frozenset(
            {
                "inference",
                "models:read",
                "models:write",
                "models:promote",
                "pools:read",
                "pools:write",
                "signing-keys:read",
                "metrics:read",
                "usage:read",
                "keys:write",
                "self",
            }
        ),
    ),
    "developer": (
        "uses inference and manages own keys",
        frozenset({"inference", "models:read", "keys:write", "watermark:detect", "finetune", "self"}),
    ),
    "auditor": (
        "reads audit events and usage",
        frozenset(
            {
                "audit:read",
                "usage:read",
                "users:read",
                "keys:read",
                "roles:read",
                "orgs:read",
                "models:read",
                "pools:read",
                "signing-keys:read",
                "watermark:read",
                "self",
            }
        ),
    ),
    "client": ("inference only", frozenset({"inference", "models:read", "self"})),
}

# Roles whose grant is itself privileged: assigning them needs `roles:write` and a fresh MFA step-up.
ADMIN_ROLES = frozenset({"owner", "admin"})

# Key scopes: a few names users ask for, each standing for a set of permissions; any permission name is
# also a scope of itself.
SCOPES: dict[str, frozenset[str]] = {
    "inference": frozenset({"inference", "models:read"}),
    "finetune": frozenset({"finetune", "models:read"}),
    "admin": frozenset(_ADMIN),
    "*": frozenset(PERMISSIONS),
}

# Permissions whose use needs a token with MFA in `amr` and a recent `auth_time`.
STEP_UP = frozenset(
    {
        "models:promote",
        "pools:write",
        "watermark:admin",
        "orgs:write",
        "roles:write",
        "signing-keys:rotate",
        "policy:write",
    }
)


class UnknownScope(ValueError):
    pass


def expand_scopes(scopes: Iterable[str]) -> frozenset[str]:
    granted: set[str] = set()
    for scope in scopes:
        if scope in SCOPES:
            granted |= SCOPES[scope]
        elif scope in PERMISSIONS:
            granted.add(scope)
        else:
            raise UnknownScope(f"unknown scope {scope!r}; known: {', '.join(sorted(set(SCOPES) | set(PERMISSIONS)))}")
    return frozenset(granted)


def effective_permissions(role_permissions: Iterable[str], scopes: Iterable[str]) -> frozenset[str]:
    return frozenset(role_permissions) & expand_scopes(scopes)
