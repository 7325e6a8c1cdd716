"""Organizations, users and roles: the operations the admin API and the CLI share.

Every change records its audit event in the same session (transaction) and bumps the credentials counter
when it can change what a cached credential may do. The invariants that hold whoever calls (no custom role
with an installation permission; emails unique per organization, installation accounts' addresses
reserved) are enforced here; the bounds on what a caller may grant are the admin API's
(`server.identity.grants`), since the CLI acts as the installation.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.audit.service import Actor, record
from server.errors import Conflict, GrantRefused, InvalidRequest, NotFound
from server.identity.apikeys import aware, bump_credentials, user_roles
from server.identity.models import Organization, Role, User, UserRole
from server.identity.rbac import BUILTIN_ROLES, INSTALLATION_PERMISSIONS, INSTALLATION_ROLES, PERMISSIONS

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


def role_permissions(session: Session, names: list[str], org_id: str) -> frozenset[str]:
    """What the named roles (built-in, or custom roles of `org_id`) grant together; 400 for an unknown one."""
    granted: set[str] = set()
    for name in names:
        role = find_role(session, name, org_id)
        if role.builtin and role.org_id is None and name in BUILTIN_ROLES:
            granted |= BUILTIN_ROLES[name][1]
        else:
            granted |= set(role.permissions or ()) - INSTALLATION_PERMISSIONS
    return frozenset(granted)


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
    allow_reserved: bool = False,
) -> User:
    """A user of `org_id`. The email must be new *in that organization*: another organization's address is
    accepted like a new one (nothing is revealed), unless it is an installation account's (`email_reserved`)."""
    email = email.strip().lower()
    if "@" not in email or len(email) > 320:
        raise InvalidRequest("A user needs a valid email address.", param="email")
    if session.get(Organization, org_id) is None:
        raise NotFound(f"Organization {org_id!r} does not exist.", param="org_id")
    if session.scalar(select(User).where(User.org_id == org_id, User.email == email)) is not None:
        raise Conflict("A user with this email already exists in this organization.")
    if not allow_reserved and is_reserved_email(session, email, org_id):
        raise Conflict(
            "This address belongs to an installation account and cannot be used in an organization.",
            param="email",
            code="email_reserved",
        )
    if not allow_reserved:
        check_installation_address(session, email, org_id, roles)
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


def is_reserved_email(session: Session, email: str, org_id: str) -> bool:
    """The operator service account's address, or one an installation account (owner, operator) uses in
    another organization: tenants cannot claim it (and so cannot make the owner's login ambiguous)."""
    if email == OPERATOR_EMAIL:
        return True
    holder = session.scalar(
        select(User.id)
        .join(UserRole, UserRole.user_id == User.id)
        .join(Role, Role.id == UserRole.role_id)
        .where(
            User.email == email,
            User.org_id != org_id,
            Role.builtin.is_(True),
            Role.org_id.is_(None),
            Role.name.in_(sorted(INSTALLATION_ROLES)),
        )
        .limit(1)
    )
    return holder is not None


def check_installation_address(session: Session, email: str, org_id: str, roles: list[str]) -> None:
    """An installation account's address must be unique across organizations, so its password login is never
    ambiguous (and stays reserved): refuse an installation role for an address used elsewhere."""
    if not set(roles) & INSTALLATION_ROLES:
        return
    elsewhere = session.scalar(select(User.id).where(User.email == email, User.org_id != org_id).limit(1))
    if elsewhere is not None:
        raise Conflict(
            "An installation role needs an address no other organization uses; use another address.",
            param="roles",
            code="email_not_unique",
        )


def set_roles(session: Session, actor: Actor, user: User, roles: list[str]) -> None:
    before, _ = user_roles(session, user.id)
    check_installation_address(session, user.email, user.org_id, roles)
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
    installation = sorted(set(permissions) & INSTALLATION_PERMISSIONS)
    if installation:  # whoever asks: organization roles never hold installation permissions
        raise GrantRefused(
            f"Organization roles cannot hold installation permissions: {', '.join(installation)}.",
            param="permissions",
            code="installation_permission",
        )
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


OPERATOR_ROLES = ("admin", "operator")


def operator_account(session: Session, org_id: str | None = None) -> User:
    """The installation's operator service account (CLI keys belong to it): the installation `operator` role
    and `admin` of its organization. Created on first use in `org_id`, else in the organization named
    "default" (created if missing); an account from before the operator role was added gets it here."""
    user = session.scalar(
        select(User)
        .where(User.email == OPERATOR_EMAIL, User.is_service_account.is_(True))
        .order_by(User.created_at, User.id)
        .limit(1)
    )
    if user is not None:
        held, _ = user_roles(session, user.id)
        if not set(OPERATOR_ROLES) <= set(held):
            ensure_builtin_roles(session)
            set_roles(session, Actor.system(), user, sorted(set(held) | set(OPERATOR_ROLES)))
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
        roles=list(OPERATOR_ROLES),
        display_name="operator service account",
        service_account=True,
        allow_reserved=True,
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
