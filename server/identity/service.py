"""Organizations, users and roles: the operations the admin API and the CLI share.

Every change records its audit event in the same session (transaction) and bumps the credentials counter
when it can change what a cached credential may do.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.audit.service import Actor, record
from server.errors import Conflict, InvalidRequest, NotFound
from server.identity.apikeys import aware, bump_credentials, user_roles
from server.identity.models import Organization, Role, User, UserRole
from server.identity.rbac import BUILTIN_ROLES, PERMISSIONS

OPERATOR_EMAIL = "operator@service.local"


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def ensure_builtin_roles(session: Session) -> None:
    existing = {r.name: r for r in session.scalars(select(Role).where(Role.org_id.is_(None)))}
    for name, (description, permissions) in BUILTIN_ROLES.items():
        row = existing.get(name)
        if row is None:
            session.add(
                Role(org_id=None, name=name, description=description, permissions=sorted(permissions), builtin=True)
            )
        elif sorted(row.permissions) != sorted(permissions):
            row.permissions, row.description = sorted(permissions), description
    session.flush()


def find_role(session: Session, name: str, org_id: str) -> Role:
    role = session.scalar(select(Role).where(Role.name == name, Role.org_id.is_(None)))
    role = role or session.scalar(select(Role).where(Role.name == name, Role.org_id == org_id))
    if role is None:
        raise InvalidRequest(f"Unknown role {name!r}.", param="roles")
    return role


def create_org(session: Session, actor: Actor, name: str) -> Organization:
    if session.scalar(select(Organization).where(Organization.name == name)) is not None:
        raise Conflict(f"An organization named {name!r} already exists.")
    org = Organization(id=new_id("org"), name=name)
    session.add(org)
    session.flush()
    record(session, actor, "orgs.create", "success", target_type="org", target_id=org.id, org_id=org.id, name=name)
    return org


def create_user(
    session: Session,
    actor: Actor,
    *,
    org_id: str,
    email: str,
    roles: list[str],
    password_hash: str | None = None,
    display_name: str = "",
    service_account: bool = False,
) -> User:
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise InvalidRequest("A user needs a valid email address.", param="email")
    if session.get(Organization, org_id) is None:
        raise NotFound(f"Organization {org_id!r} does not exist.", param="org_id")
    if session.scalar(select(User).where(User.email == email)) is not None:
        raise Conflict("A user with this email already exists.")
    user = User(
        id=new_id("usr"),
        org_id=org_id,
        email=email,
        display_name=display_name,
        password_hash=password_hash,
        is_service_account=service_account,
        password_changed_at=datetime.now(UTC) if password_hash else None,
    )
    session.add(user)
    session.flush()
    for name in roles:
        session.add(UserRole(user_id=user.id, role_id=find_role(session, name, org_id).id))
    session.flush()
    record(
        session,
        actor,
        "users.create",
        "success",
        target_type="user",
        target_id=user.id,
        org_id=org_id,
        email=email,
        roles=sorted(roles),
        service_account=service_account,
    )
    return user


def set_roles(session: Session, actor: Actor, user: User, roles: list[str]) -> None:
    before, _ = user_roles(session, user.id)
    for link in session.scalars(select(UserRole).where(UserRole.user_id == user.id)):
        session.delete(link)
    session.flush()
    for name in roles:
        session.add(UserRole(user_id=user.id, role_id=find_role(session, name, user.org_id).id))
    bump_credentials(session)
    record(
        session,
        actor,
        "users.roles",
        "success",
        target_type="user",
        target_id=user.id,
        org_id=user.org_id,
        before=list(before),
        after=sorted(roles),
    )


def set_disabled(session: Session, actor: Actor, user: User, disabled: bool) -> None:
    user.disabled = disabled
    bump_credentials(session)
    record(
        session,
        actor,
        "users.disable" if disabled else "users.enable",
        "success",
        target_type="user",
        target_id=user.id,
        org_id=user.org_id,
    )


def create_role(
    session: Session, actor: Actor, org_id: str, name: str, permissions: list[str], description: str = ""
) -> Role:
    unknown = sorted(set(permissions) - set(PERMISSIONS))
    if unknown:
        raise InvalidRequest(f"Unknown permissions: {', '.join(unknown)}.", param="permissions")
    if name in BUILTIN_ROLES or session.scalar(select(Role).where(Role.org_id == org_id, Role.name == name)):
        raise Conflict(f"A role named {name!r} already exists.")
    role = Role(org_id=org_id, name=name, description=description, permissions=sorted(set(permissions)), builtin=False)
    session.add(role)
    session.flush()
    record(
        session,
        actor,
        "roles.create",
        "success",
        target_type="role",
        target_id=str(role.id),
        org_id=org_id,
        name=name,
        permissions=role.permissions,
    )
    return role


def operator_account(session: Session, org_id: str | None = None) -> User:
    """The installation's operator service account (CLI keys belong to it), created on first use in `org_id`,
    else in the organization named "default" (created if missing)."""
    user = session.scalar(select(User).where(User.email == OPERATOR_EMAIL))
    if user is not None:
        return user
    ensure_builtin_roles(session)
    if org_id is None:
        org = session.scalar(select(Organization).where(Organization.name == "default"))
        org_id = (org or create_org(session, Actor.system(), "default")).id
    return create_user(
        session,
        Actor.system(),
        org_id=org_id,
        email=OPERATOR_EMAIL,
        roles=["admin"],
        display_name="operator service account",
        service_account=True,
    )


@dataclass(frozen=True)
class Page:
    data: list[dict[str, Any]]
    has_more: bool
    next_after: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"object": "list", "data": self.data, "has_more": self.has_more, "next_after": self.next_after}


def user_view(session: Session, user: User) -> dict[str, Any]:
    roles, _ = user_roles(session, user.id)
    created = aware(user.created_at)
    return {
        "id": user.id,
        "object": "user",
        "org_id": user.org_id,
        "email": user.email,
        "display_name": user.display_name,
        "roles": list(roles),
        "disabled": user.disabled,
        "service_account": user.is_service_account,
        "created_at": created.isoformat() if created else None,
    }
