"""API keys: `sk-<key id>-<secret>`, a visible 12-character id and a 256-bit secret.

Only HMAC-SHA256(pepper, whole key) is stored and looked up; a stolen database does not yield keys, and
checking a key costs one HMAC, not a slow hash. The key is parsed strictly (case-sensitive, exact
lengths) before anything touches the database.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from server.identity.models import ApiKey, ChangeCounter, Organization, Role, User, UserRole
from server.identity.rbac import BUILTIN_ROLES, ORGANIZATION_PERMISSIONS, PERMISSIONS, UnknownScope, expand_scopes

KEY_RE = re.compile(r"sk-([a-z0-9]{12})-([A-Za-z0-9_-]{43})")
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
CREDENTIALS = "credentials"


def _secret() -> str:
    """256 random bits, base64url without padding (43 characters, may contain '-' and '_')."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def new_key() -> tuple[str, str]:
    """A fresh (key id, plaintext key)."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    return key_id, f"sk-{key_id}-{_secret()}"


def parse_key(value: str) -> str | None:
    """The key id if `value` is shaped like one of our keys, else None."""
    match = KEY_RE.fullmatch(value)
    return match.group(1) if match else None


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def bump_credentials(session: Session) -> None:
    """Tell every replica's credential cache to drop its entries (same transaction as the change)."""
    updated = session.execute(
        update(ChangeCounter).where(ChangeCounter.name == CREDENTIALS).values(value=ChangeCounter.value + 1)
    )
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        session.add(ChangeCounter(name=CREDENTIALS, value=1))


def credentials_epoch(session: Session) -> int:
    return session.scalar(select(ChangeCounter.value).where(ChangeCounter.name == CREDENTIALS)) or 0


def user_roles(session: Session, user_id: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """Role names and their permissions. Built-in roles take their permissions from code, not the DB; a custom
    (organization) role contributes organization permissions only, whatever its row says, and one that
    carries a built-in role's name is ignored."""
    rows = session.execute(
        select(Role.name, Role.permissions, Role.builtin, Role.org_id)
        .join(UserRole, UserRole.role_id == Role.id)
        .where(UserRole.user_id == user_id)
    ).all()
    names: list[str] = []
    perms: set[str] = set()
    for name, permissions, builtin, org_id in rows:
        if builtin and org_id is None and name in BUILTIN_ROLES:
            names.append(name)
            perms |= BUILTIN_ROLES[name][1]
        elif not builtin and name not in BUILTIN_ROLES:
            names.append(name)
            perms |= set(permissions or ()) & ORGANIZATION_PERMISSIONS
    return tuple(sorted(names)), frozenset(perms)


def key_permissions(session: Session, row: ApiKey) -> frozenset[str]:
    """What a key can do now: its owner's role permissions ∩ its scopes (everything, if a stored scope is
    no longer known: callers use this to refuse, so unknown means as powerful as can be)."""
    _, perms = user_roles(session, row.user_id)
    try:
        return perms & expand_scopes(row.scopes)
    except UnknownScope:
        return frozenset(PERMISSIONS)


@dataclass(frozen=True)
class KeyRecord:
    """What authentication needs from a key row, its owner and their roles (cacheable)."""

    id: str
    org_id: str
    user_id: str
    mac: str  # the HMAC this record was found by
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None
    limits: dict[str, Any]
    roles: tuple[str, ...]
    role_permissions: frozenset[str]
    expires_at: datetime | None  # of the key, or of the previous secret during a rotation overlap
    created_at: datetime
    active: bool  # not revoked, owner and org enabled
    email: str | None = None


def load_key(session: Session, mac: str) -> KeyRecord | None:
    row = session.scalar(select(ApiKey).where(or_(ApiKey.secret_hmac == mac, ApiKey.prev_secret_hmac == mac)))
    if row is None:
        return None
    current = hmac.compare_digest(row.secret_hmac, mac)
    if not current and not (row.prev_secret_hmac and hmac.compare_digest(row.prev_secret_hmac, mac)):
        return None
    user = session.get(User, row.user_id)
    org = session.get(Organization, row.org_id)
    roles, perms = user_roles(session, row.user_id)
    expiry = aware(row.expires_at)
    if not current:
        overlap_end = aware(row.prev_expires_at)
        expiry = overlap_end if expiry is None or (overlap_end and overlap_end < expiry) else expiry
        if overlap_end is None:
            return None
    active = row.revoked_at is None and user is not None and not user.disabled and org is not None and not org.disabled
    return KeyRecord(
        id=row.id,
        org_id=row.org_id,
        user_id=row.user_id,
        mac=mac,
        scopes=tuple(row.scopes),
        models=tuple(row.models) if row.models is not None else None,
        limits=dict(row.limits or {}),
        roles=roles,
        role_permissions=perms,
        expires_at=expiry,
        created_at=aware(row.created_at) or datetime.now(UTC),
        active=active,
        email=user.email if user is not None else None,
    )


def create_key(
    session: Session,
    mac_of: Any,
    *,
    org_id: str,
    user_id: str,
    name: str,
    scopes: list[str],
    models: list[str] | None = None,
    expires_at: datetime | None = None,
    limits: dict[str, Any] | None = None,
    created_by: str | None = None,
) -> tuple[ApiKey, str]:
    expand_scopes(scopes)  # raises UnknownScope
    key_id, plaintext = new_key()
    row = ApiKey(
        id=key_id,
        org_id=org_id,
        user_id=user_id,
        name=name,
        secret_hmac=mac_of(plaintext),
        scopes=list(scopes),
        models=models,
        limits=limits or {},
        expires_at=expires_at,
        created_by=created_by,
    )
    session.add(row)
    session.flush()
    return row, plaintext


def rotate_key(session: Session, mac_of: Any, row: ApiKey, overlap_seconds: int) -> str:
    """A new secret for the same key id; the old one keeps working for the overlap window, then dies."""
    plaintext = f"sk-{row.id}-{_secret()}"
    row.prev_secret_hmac = row.secret_hmac if overlap_seconds > 0 else None
    row.prev_expires_at = datetime.now(UTC) + timedelta(seconds=overlap_seconds) if overlap_seconds > 0 else None
    row.secret_hmac = mac_of(plaintext)
    bump_credentials(session)
    return plaintext


def revoke_key(session: Session, row: ApiKey) -> None:
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
    bump_credentials(session)


def key_view(row: ApiKey) -> dict[str, Any]:
    """A key as the admin API shows it: never the secret or its HMAC."""

    def iso(value: datetime | None) -> str | None:
        value = aware(value)
        return value.isoformat() if value else None

    return {
        "id": row.id,
        "object": "api_key",
        "org_id": row.org_id,
        "user_id": row.user_id,
        "name": row.name,
        "scopes": row.scopes,
        "models": row.models,
        "limits": row.limits,
        "created_at": iso(row.created_at),
        "expires_at": iso(row.expires_at),
        "revoked_at": iso(row.revoked_at),
        "last_used_at": iso(row.last_used_at),
        "rotation_overlap_until": iso(row.prev_expires_at),
        "prefix": f"sk-{row.id}-",
    }
