"""Permissions, their scope of authority, built-in roles and key scopes. Deny by default: what is not granted
here is refused.

Every permission belongs to one of two scopes of authority:

- **installation**: resources every tenant shares: pools and engines, the model registry and promotion, the
  JWT signing keys, the default watermark key, installation-wide metrics, organizations and their quotas.
  Only installation roles (`owner`, `operator`) hold these permissions.
- **organization**: one organization's own users, roles, keys, limits, audit trail and watermark keys, and
  the use of the service (inference, detection, fine-tuning uploads).

Organization roles, built-in or custom, never hold an installation permission: the built-in ones are checked
when this module loads, custom ones are refused at creation (`service.create_role`) and filtered again when
a user's roles are loaded (`apikeys.user_roles`), so no row in the database can carry one in.

A caller's effective permissions are the union of its roles' permissions, narrowed by the scopes of the
credential it used (an API key's scopes, or a token's): `effective = role_permissions ∩ expand(scopes)`.
Who may grant what is in `server.identity.grants`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Authority = Literal["installation", "organization"]
INSTALLATION: Authority = "installation"
ORGANIZATION: Authority = "organization"

# "public" marks a route that needs no credential.
PUBLIC = "public"


@dataclass(frozen=True)
class Permission:
    description: str
    scope: Authority
    step_up: bool = False  # its use needs a token with a fresh second factor


def _org(description: str, *, step_up: bool = False) -> Permission:
    return Permission(description, ORGANIZATION, step_up)


def _installation(description: str, *, step_up: bool = False) -> Permission:
    return Permission(description, INSTALLATION, step_up)


CATALOG: dict[str, Permission] = {
    "inference": _org("call the completion endpoints"),
    "models:read": _org("list served models (name, version, digest)"),
    "finetune": _org("upload fine-tuning data"),
    "watermark:detect": _org("call the watermark detection API"),
    "watermark:read": _org("read the organization's watermark key ids, parameters and exemptions (never key material)"),
    "watermark:admin": _org("manage the organization's watermark keys and exemptions", step_up=True),
    "orgs:read": _org("read the caller's own organization (the owner reads every one)"),
    "users:read": _org("read users of the caller's organization"),
    "users:write": _org("create, disable and change users of the caller's organization"),
    "roles:read": _org("read roles"),
    "roles:write": _org("create custom roles and change role assignments", step_up=True),
    "keys:read": _org("read API keys of the caller's organization"),
    "keys:write": _org("create, rotate and revoke the caller's own API keys"),
    "keys:admin": _org("create, rotate and revoke other users' API keys (rotation for others: step-up)"),
    "policy:write": _org("change the limits of the organization's keys and users", step_up=True),
    "audit:read": _org("read audit events of the caller's organization"),
    "usage:read": _org("read limits and usage of the caller's organization"),
    "self": _org("read one's own identity and manage one's own factors (interactive sessions only)"),
    # -- installation-wide resources ------------------------------------------------------------------------
    "orgs:write": _installation("create and change organizations", step_up=True),
    "quotas:write": _installation("set an organization's own limits (its quota)", step_up=True),
    "registry:read": _installation(
        "read model registry internals: stored paths, provenance, signers, evaluation detail, BOMs"
    ),
    "models:write": _installation("import, sign, verify and evaluate model versions"),
    "models:promote": _installation("promote or roll back model versions", step_up=True),
    "pools:read": _installation("read pool state, admission and GPU telemetry"),
    "pools:write": _installation("drain, isolate or resume pools", step_up=True),
    "signing-keys:read": _installation("read JWT signing key metadata"),
    "signing-keys:rotate": _installation("rotate the JWT signing key", step_up=True),
    "watermark:default": _installation("rotate the installation's default watermark key", step_up=True),
    "metrics:read": _installation("scrape the installation-wide /metrics"),
}

PERMISSIONS: dict[str, str] = {name: p.description for name, p in CATALOG.items()}
INSTALLATION_PERMISSIONS = frozenset(n for n, p in CATALOG.items() if p.scope == INSTALLATION)
ORGANIZATION_PERMISSIONS = frozenset(n for n, p in CATALOG.items() if p.scope == ORGANIZATION)
# Permissions whose use needs a token with MFA in `amr` and a recent `auth_time`.
STEP_UP = frozenset(n for n, p in CATALOG.items() if p.step_up)


def permission_scope(permission: str) -> Authority | None:
    """The scope of authority a permission (or route permission) belongs to; None for `public`."""
    return None if permission == PUBLIC else CATALOG[permission].scope


BUILTIN_ROLES: dict[str, tuple[str, frozenset[str]]] = {
    "owner": ("the installation's owner: every permission, across organizations", frozenset(PERMISSIONS)),
    "operator": (
        "runs the installation's models, pools and organization quotas",
        frozenset(
            {
                "inference",
                "models:read",
                "registry:read",
                "models:write",
                "models:promote",
                "pools:read",
                "pools:write",
                "quotas:write",
                "signing-keys:read",
                "metrics:read",
                "usage:read",
                "keys:write",
                "self",
            }
        ),
    ),
    "admin": ("administers one organization", ORGANIZATION_PERMISSIONS),
    "developer": (
        "uses inference and manages own keys",
        frozenset({"inference", "models:read", "keys:write", "watermark:detect", "finetune", "self"}),
    ),
    "auditor": (
        "reads the organization's audit events and usage",
        frozenset(
            {
                "audit:read",
                "usage:read",
                "users:read",
                "keys:read",
                "roles:read",
                "orgs:read",
                "models:read",
                "watermark:read",
                "self",
            }
        ),
    ),
    "client": ("inference only", frozenset({"inference", "models:read", "self"})),
}

# Installation roles; every other role (built-in or custom) is an organization role.
INSTALLATION_ROLES = frozenset({"owner", "operator"})


def role_scope(name: str) -> Authority:
    return INSTALLATION if name in INSTALLATION_ROLES else ORGANIZATION


def _check_construction() -> None:
    for name, (_, permissions) in BUILTIN_ROLES.items():
        if role_scope(name) == ORGANIZATION and not permissions <= ORGANIZATION_PERMISSIONS:
            leaked = sorted(permissions - ORGANIZATION_PERMISSIONS)
            raise RuntimeError(f"organization role {name!r} holds installation permissions {leaked}")


_check_construction()

# Key scopes: a few names users ask for, each standing for a set of permissions; any permission name is
# also a scope of itself. Scopes only narrow: a key never does more than its owner's roles allow.
SCOPES: dict[str, frozenset[str]] = {
    "inference": frozenset({"inference", "models:read"}),
    "finetune": frozenset({"finetune", "models:read"}),
    "admin": frozenset(PERMISSIONS) - {"orgs:write"},
    "*": frozenset(PERMISSIONS),
}


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
