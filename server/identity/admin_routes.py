"""Admin API for organizations, users, roles, API keys and signing keys. Org-isolated, audited.

Reads of another organization's objects answer 404 (their existence is not revealed) unless the caller is
the installation's owner. Every grant (a key, a role, a role assignment, a user with roles) is bounded by
what the caller holds (`server.identity.grants`); a refusal is audited (outcome `denied`) and changes
nothing, since the refused operation's transaction rolls back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.api.body import read_body
from server.api.protocol import StrictModel, parse_request
from server.audit.service import record
from server.errors import InvalidRequest, NotFound, PermissionDenied, StepUpRequired
from server.identity import grants, service
from server.identity.apikeys import create_key, key_permissions, key_view, revoke_key, rotate_key, user_roles
from server.identity.authn import client_addr, principal_of
from server.identity.authz import requires
from server.identity.models import ApiKey, Organization, Role, User
from server.identity.passwords import check_policy
from server.identity.principal import Principal
from server.identity.rbac import UnknownScope, role_scope

router = APIRouter(prefix="/v1/admin")
_BODY_LIMIT = 64 * 1024
T = TypeVar("T")


class OrgCreate(StrictModel):
    name: str = Field(min_length=1, max_length=200)


class UserCreate(StrictModel):
    email: str = Field(min_length=3, max_length=320)
    roles: list[str] = Field(default_factory=list, max_length=16)  # roles given here are a role assignment
    password: str | None = Field(default=None, max_length=256)
    display_name: str = Field(default="", max_length=200)
    org_id: str | None = None


class RolesUpdate(StrictModel):
    roles: list[str] = Field(max_length=16)


class RoleCreate(StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9_-]+$")
    permissions: list[str] = Field(max_length=64)
    description: str = Field(default="", max_length=500)


class KeyCreate(StrictModel):
    name: str = Field(default="", max_length=200)
    scopes: list[str] = Field(default_factory=lambda: ["inference"], min_length=1, max_length=32)
    models: list[str] | None = Field(default=None, max_length=256)
    expires_at: datetime | None = None
    limits: dict[str, int] = Field(default_factory=dict)
    user_id: str | None = None


async def _in_thread(
    request: Request, action: str, work: Callable[[Session, Principal], T], *, invalidates: bool = False
) -> T:
    """Run a blocking admin operation in one transaction, with the caller resolved.

    A refusal (permission, grant bound, step-up) raised by `work` rolls the transaction back and is audited
    as `action` with outcome `denied`. `invalidates`: the change alters what credentials may do, so this
    replica drops its credential cache as soon as the transaction commits (other replicas follow through
    the change counter)."""
    principal = principal_of(request)

    def run() -> T:
        with request.app.state.db.session() as session:
            result = work(session, principal)
        if invalidates:
            request.app.state.authenticator.invalidate()
        return result

    try:
        return await asyncio.to_thread(run)
    except (PermissionDenied, StepUpRequired) as exc:
        request.app.state.audit_sink.submit(
            principal.actor(client_addr(request)),
            action,
            "denied",
            reason=exc.code,
            message=exc.message[:300],
            path=request.url.path,
        )
        raise


def _step_up(request: Request, principal: Principal, what: str) -> None:
    if not principal.mfa_fresh(request.app.state.settings.auth.step_up_max_age_seconds, time.time()):
        raise StepUpRequired(f"{what} needs a recent second factor: get a token with your password and TOTP code.")


def _page(request: Request) -> tuple[int, str | None]:
    try:
        limit = int(request.query_params.get("limit", "50"))
    except ValueError:
        raise InvalidRequest("limit must be an integer", param="limit") from None
    if not 1 <= limit <= 500:
        raise InvalidRequest("limit must be between 1 and 500", param="limit")
    return limit, request.query_params.get("after")


def _org_scope(principal: Principal, requested: str | None) -> str | None:
    """The org a listing covers: the caller's own; the owner may name any (or all with none)."""
    if principal.is_owner:
        return requested
    if requested is not None and requested != principal.org_id:
        raise PermissionDenied("You can only list your own organization.")
    return principal.org_id


def _visible(principal: Principal, org_id: str, what: str) -> None:
    if not principal.may_access_org(org_id):
        raise NotFound(f"{what} not found.")


# -- organizations ------------------------------------------------------------------------------------
@router.get("/orgs", dependencies=[requires("orgs:read")])
async def list_orgs(request: Request) -> dict[str, Any]:
    limit, after = _page(request)

    def work(session: Session, p: Principal) -> dict[str, Any]:
        query = select(Organization).order_by(Organization.id).limit(limit + 1)
        if not p.is_owner:
            query = query.where(Organization.id == p.org_id)
        if after:
            query = query.where(Organization.id > after)
        rows = list(session.scalars(query))
        data: list[dict[str, Any]] = [
            {"id": o.id, "object": "organization", "name": o.name, "disabled": o.disabled} for o in rows[:limit]
        ]
        return service.Page(data, len(rows) > limit, data[-1]["id"] if len(rows) > limit else None).as_dict()

    return await _in_thread(request, "orgs.list", work)


@router.post("/orgs", dependencies=[requires("orgs:write")], status_code=201)
async def create_org(request: Request) -> dict[str, Any]:
    req = parse_request(OrgCreate, await read_body(request, _BODY_LIMIT))

    def work(session: Session, p: Principal) -> dict[str, Any]:
        org = service.create_org(session, p.actor(client_addr(request)), req.name)
        return {"id": org.id, "object": "organization", "name": org.name}

    return await _in_thread(request, "orgs.create", work)


# -- users ----------------------------------------------------------------------------------------------
@router.get("/users", dependencies=[requires("users:read")])
async def list_users(request: Request) -> dict[str, Any]:
    limit, after = _page(request)
    org_filter = request.query_params.get("org_id")

    def work(session: Session, p: Principal) -> dict[str, Any]:
        org_id = _org_scope(p, org_filter)
        query = select(User).order_by(User.id).limit(limit + 1)
        if org_id is not None:
            query = query.where(User.org_id == org_id)
        if after:
            query = query.where(User.id > after)
        rows = list(session.scalars(query))
        data = [service.user_view(session, u) for u in rows[:limit]]
        return service.Page(data, len(rows) > limit, data[-1]["id"] if len(rows) > limit else None).as_dict()

    return await _in_thread(request, "users.list", work)


@router.post("/users", dependencies=[requires("users:write")], status_code=201)
async def create_user(request: Request) -> dict[str, Any]:
    req = parse_request(UserCreate, await read_body(request, _BODY_LIMIT))
    state = request.app.state

    def work(session: Session, p: Principal) -> dict[str, Any]:
        org_id = req.org_id or p.org_id
        _visible(p, org_id, "Organization")
        if req.roles:  # creating a user with roles is assigning them
            if not p.can("roles:write"):
                raise PermissionDenied("Creating a user with roles assigns them: that needs 'roles:write'.")
            _step_up(request, p, "Assigning roles")
            granted = service.role_permissions(session, req.roles, org_id)
            grants.check_assignment(p, req.roles, granted, frozenset())
        password_hash = None
        if req.password is not None:
            try:
                check_policy(req.password, min_length=state.settings.auth.password_min_length, email=req.email)
            except ValueError as exc:
                raise InvalidRequest(str(exc), param="password") from None
            password_hash = state.hasher.hash(req.password)
        user = service.create_user(
            session,
            p.actor(client_addr(request)),
            org_id=org_id,
            email=req.email,
            roles=req.roles,
            password_hash=password_hash,
            display_name=req.display_name,
        )
        return service.user_view(session, user)

    return await _in_thread(request, "users.create", work, invalidates=bool(req.roles))


@router.get("/users/{user_id}", dependencies=[requires("users:read")])
async def get_user(user_id: str, request: Request) -> dict[str, Any]:
    def work(session: Session, p: Principal) -> dict[str, Any]:
        user = session.get(User, user_id)
        if user is None:
            raise NotFound("User not found.")
        _visible(p, user.org_id, "User")
        return service.user_view(session, user)

    return await _in_thread(request, "users.get", work)


@router.put("/users/{user_id}/roles", dependencies=[requires("roles:write")])
async def set_user_roles(user_id: str, request: Request) -> dict[str, Any]:
    req = parse_request(RolesUpdate, await read_body(request, _BODY_LIMIT))

    def work(session: Session, p: Principal) -> dict[str, Any]:
        user = session.get(User, user_id)
        if user is None:
            raise NotFound("User not found.")
        _visible(p, user.org_id, "User")
        granted = service.role_permissions(session, req.roles, user.org_id)
        grants.check_assignment(p, req.roles, granted, user_roles(session, user.id)[1])
        service.set_roles(session, p.actor(client_addr(request)), user, req.roles)
        return service.user_view(session, user)

    return await _in_thread(request, "users.roles", work, invalidates=True)


@router.post("/users/{user_id}/disable", dependencies=[requires("users:write")])
async def disable_user(user_id: str, request: Request) -> dict[str, Any]:
    def work(session: Session, p: Principal) -> dict[str, Any]:
        user = session.get(User, user_id)
        if user is None:
            raise NotFound("User not found.")
        _visible(p, user.org_id, "User")
        grants.check_may_manage(p, user_roles(session, user.id)[1], "Disabling this user")
        service.set_disabled(session, p.actor(client_addr(request)), user, True)
        return service.user_view(session, user)

    return await _in_thread(request, "users.disable", work, invalidates=True)


# -- roles ----------------------------------------------------------------------------------------------
@router.get("/roles", dependencies=[requires("roles:read")])
async def list_roles(request: Request) -> dict[str, Any]:
    def work(session: Session, p: Principal) -> dict[str, Any]:
        rows = session.scalars(
            select(Role).where((Role.org_id.is_(None)) | (Role.org_id == p.org_id)).order_by(Role.id)
        )
        data = [
            {
                "name": r.name,
                "object": "role",
                "builtin": r.builtin,
                "description": r.description,
                "permissions": r.permissions,
                "org_id": r.org_id,
                "scope": role_scope(r.name) if r.builtin else "organization",
            }
            for r in rows
        ]
        return service.Page(data, False, None).as_dict()

    return await _in_thread(request, "roles.list", work)


@router.post("/roles", dependencies=[requires("roles:write")], status_code=201)
async def create_role(request: Request) -> dict[str, Any]:
    req = parse_request(RoleCreate, await read_body(request, _BODY_LIMIT))

    def work(session: Session, p: Principal) -> dict[str, Any]:
        grants.check_role_contents(p, req.permissions)
        role = service.create_role(
            session, p.actor(client_addr(request)), p.org_id, req.name, req.permissions, req.description
        )
        return {"name": role.name, "object": "role", "permissions": role.permissions, "org_id": role.org_id}

    return await _in_thread(request, "roles.create", work)


# -- API keys -------------------------------------------------------------------------------------------
def _key_for_change(session: Session, p: Principal, key_id: str, *, hands_over: bool) -> ApiKey:
    """The key to rotate (`hands_over`: its new secret goes to the caller) or revoke.

    Another user's key needs `keys:admin`; a key that can do more than the caller is refused for rotation
    always (the caller would get its powers) and for revocation when it is someone else's."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound("API key not found.")
    _visible(p, row.org_id, "API key")
    if row.user_id != p.user_id and not p.can("keys:admin"):
        raise PermissionDenied("Changing other users' keys needs the 'keys:admin' permission.")
    if hands_over or row.user_id != p.user_id:
        grants.check_may_manage(p, key_permissions(session, row), "Rotating or revoking this key")
    return row


@router.get("/keys", dependencies=[requires("keys:write")])
async def list_keys(request: Request) -> dict[str, Any]:
    limit, after = _page(request)
    org_filter = request.query_params.get("org_id")

    def work(session: Session, p: Principal) -> dict[str, Any]:
        query = select(ApiKey).order_by(ApiKey.id).limit(limit + 1)
        if p.can("keys:read") or p.can("keys:admin"):
            org_id = _org_scope(p, org_filter)
            if org_id is not None:
                query = query.where(ApiKey.org_id == org_id)
        else:
            query = query.where(ApiKey.user_id == p.user_id)
        if after:
            query = query.where(ApiKey.id > after)
        rows = list(session.scalars(query))
        data = [key_view(k) for k in rows[:limit]]
        return service.Page(data, len(rows) > limit, data[-1]["id"] if len(rows) > limit else None).as_dict()

    return await _in_thread(request, "keys.list", work)


@router.post("/keys", dependencies=[requires("keys:write")], status_code=201)
async def create_api_key(request: Request) -> dict[str, Any]:
    req = parse_request(KeyCreate, await read_body(request, _BODY_LIMIT))
    keyring = request.app.state.keyring

    def work(session: Session, p: Principal) -> dict[str, Any]:
        owner_id = req.user_id or p.user_id
        owner = session.get(User, owner_id)
        if owner is None:
            raise NotFound("User not found.", param="user_id")
        _visible(p, owner.org_id, "User")
        if owner_id != p.user_id and not p.can("keys:admin"):
            raise PermissionDenied("Creating keys for other users needs the 'keys:admin' permission.")
        try:
            grants.check_key_grant(p, req.scopes, user_roles(session, owner.id)[1], for_self=owner_id == p.user_id)
            row, plaintext = create_key(
                session,
                keyring.mac,
                org_id=owner.org_id,
                user_id=owner.id,
                name=req.name,
                scopes=req.scopes,
                models=req.models,
                expires_at=req.expires_at,
                limits=req.limits,
                created_by=p.user_id,
            )
        except UnknownScope as exc:
            raise InvalidRequest(str(exc), param="scopes") from None
        record(
            session,
            p.actor(client_addr(request)),
            "keys.create",
            "success",
            target_type="api_key",
            target_id=row.id,
            org_id=row.org_id,
            scopes=req.scopes,
            user_id=owner.id,
        )
        return {**key_view(row), "key": plaintext}

    return await _in_thread(request, "keys.create", work)


@router.post("/keys/{key_id}/rotate", dependencies=[requires("keys:write")])
async def rotate_api_key(key_id: str, request: Request) -> dict[str, Any]:
    state = request.app.state

    def work(session: Session, p: Principal) -> dict[str, Any]:
        row = _key_for_change(session, p, key_id, hands_over=True)
        if row.revoked_at is not None:
            raise InvalidRequest("A revoked key cannot be rotated.")
        if row.user_id != p.user_id:
            _step_up(request, p, "Rotating another user's key")
        plaintext = rotate_key(session, state.keyring.mac, row, state.settings.auth.key_rotation_overlap_seconds)
        record(
            session,
            p.actor(client_addr(request)),
            "keys.rotate",
            "success",
            target_type="api_key",
            target_id=row.id,
            org_id=row.org_id,
        )
        return {**key_view(row), "key": plaintext}

    return await _in_thread(request, "keys.rotate", work, invalidates=True)


@router.post("/keys/{key_id}/revoke", dependencies=[requires("keys:write")])
async def revoke_api_key(key_id: str, request: Request) -> dict[str, Any]:
    def work(session: Session, p: Principal) -> dict[str, Any]:
        row = _key_for_change(session, p, key_id, hands_over=False)
        revoke_key(session, row)
        record(
            session,
            p.actor(client_addr(request)),
            "keys.revoke",
            "success",
            target_type="api_key",
            target_id=row.id,
            org_id=row.org_id,
        )
        return key_view(row)

    return await _in_thread(request, "keys.revoke", work, invalidates=True)


# -- signing keys ---------------------------------------------------------------------------------------
@router.get("/signing-keys", dependencies=[requires("signing-keys:read")])
async def list_signing_keys(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(request.app.state.tokens.jwks)


@router.post("/signing-keys/rotate", dependencies=[requires("signing-keys:rotate")])
async def rotate_signing_key(request: Request) -> dict[str, Any]:
    state = request.app.state

    def work(session: Session, p: Principal) -> dict[str, Any]:
        kid = state.tokens.rotate()
        record(
            session,
            p.actor(client_addr(request)),
            "signing_keys.rotate",
            "success",
            target_type="signing_key",
            target_id=kid,
        )
        return {"kid": kid}

    return await _in_thread(request, "signing_keys.rotate", work)
