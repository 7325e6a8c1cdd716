"""Operator commands for identity: bootstrap, users, keys, signing keys. They work on the database directly
(no running server needed) and audit as the system actor."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from server.audit.service import Actor, record
from server.identity import service
from server.identity.apikeys import create_key, key_view, revoke_key, rotate_key
from server.identity.models import ApiKey, Organization, Role, TotpEnrolment, User, UserRole
from server.identity.passwords import PasswordHasher
from server.identity.rbac import UnknownScope
from server.identity.secrets import Keyring, load_master_secret
from server.identity.tokens import TokenService
from server.identity.totp import TotpService
from server.settings import Settings
from server.storage.db import Database
from server.storage.migrate import upgrade


class CliError(Exception):
    """A refusal with a message for the operator; exits with status 1."""


@contextmanager
def _open(settings: Settings) -> Iterator[tuple[Database, Keyring]]:
    """The migrated database (with built-in roles) and the keyring, disposed of afterwards."""
    upgrade(settings.sqlalchemy_url)
    db = Database(settings.sqlalchemy_url)
    try:
        with db.session() as session:
            service.ensure_builtin_roles(session)
        yield db, Keyring(load_master_secret(settings))
    finally:
        db.dispose()


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else text)


def bootstrap(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (db, keyring):
        with db.session() as session:
            owner_role = session.scalar(select(Role).where(Role.name == "owner", Role.org_id.is_(None)))
            has_owner = (
                session.scalar(select(UserRole).where(UserRole.role_id == owner_role.id)) if owner_role else None
            )
            if has_owner is not None:
                raise CliError("an owner already exists; bootstrap runs once. Use `users` and `keys` commands.")
            actor = Actor.system()
            org = session.scalar(select(Organization).where(Organization.name == args.org)) or service.create_org(
                session, actor, args.org
            )
            password = secrets.token_urlsafe(18)
            owner = service.create_user(
                session,
                actor,
                org_id=org.id,
                email=args.email,
                roles=["owner"],
                password_hash=PasswordHasher().hash(password),
                display_name="owner",
            )
            totp = TotpService(keyring, issuer=settings.auth.issuer)
            uri = totp.enroll(session, owner.id, owner.email)
            # The URI is handed to the owner right here, so the enrolment is confirmed without a code.
            enrolment = session.get(TotpEnrolment, owner.id)
            enrolment.confirmed_at = datetime.now(UTC)
            codes = totp.regenerate_recovery_codes(session, owner.id)
            operator = service.operator_account(session, org.id)
            record(session, actor, "bootstrap", "success", target_type="user", target_id=owner.id, org_id=org.id)
            out = {
                "org_id": org.id,
                "owner_id": owner.id,
                "email": owner.email,
                "password": password,
                "totp_provisioning_uri": uri,
                "recovery_codes": codes,
                "operator_service_account": operator.id,
            }
        TokenService(db, keyring, settings.auth).ensure_signing_key()
    _emit(
        args,
        out,
        "\n".join(
            [
                f"organization {out['org_id']} ({args.org}); owner {out['email']}",
                f"one-time password (shown once, change it): {password}",
                f"TOTP provisioning URI (shown once, add it to an authenticator app): {uri}",
                "recovery codes (shown once, each works once): " + " ".join(codes),
            ]
        ),
    )
    return 0


def orgs_create(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (db, _), db.session() as session:
        org = service.create_org(session, Actor.system(), args.name)
        out = {"id": org.id, "name": org.name}
    _emit(args, out, f"{out['id']} {out['name']}")
    return 0


def orgs_list(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (db, _), db.session() as session:
        rows = [{"id": o.id, "name": o.name} for o in session.scalars(select(Organization).order_by(Organization.name))]
    _emit(args, rows, "\n".join(f"{o['id']}\t{o['name']}" for o in rows))
    return 0


def users_create(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (db, _), db.session() as session:
        org_id = args.org or service.operator_account(session).org_id
        org = session.get(Organization, org_id)
        if org is None:
            raise CliError(f"organization {args.org!r} does not exist")
        password = secrets.token_urlsafe(18) if args.password else None
        user = service.create_user(
            session,
            Actor.system(),
            org_id=org.id,
            email=args.email,
            roles=args.roles.split(","),
            password_hash=PasswordHasher().hash(password) if password else None,
        )
        out = {**service.user_view(session, user), **({"password": password} if password else {})}
    _emit(
        args,
        out,
        f"{out['id']} {out['email']} roles={','.join(out['roles'])}"
        + (f" one-time password: {password}" if password else ""),
    )
    return 0


def users_list(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (db, _), db.session() as session:
        rows = [service.user_view(session, u) for u in session.scalars(select(User).order_by(User.created_at))]
    _emit(
        args,
        rows,
        "\n".join(
            f"{u['id']}\t{u['email']}\t{','.join(u['roles'])}\t{'disabled' if u['disabled'] else 'active'}"
            for u in rows
        ),
    )
    return 0


def keys_create(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (db, keyring), db.session() as session:
        user = session.get(User, args.user) if args.user else service.operator_account(session)
        if user is None:
            raise CliError(f"user {args.user!r} does not exist")
        expires = datetime.now(UTC) + timedelta(days=args.expires_days) if args.expires_days else None
        try:
            row, plaintext = create_key(
                session,
                keyring.mac,
                org_id=user.org_id,
                user_id=user.id,
                name=args.name,
                scopes=args.scopes.split(","),
                models=args.models.split(",") if args.models else None,
                expires_at=expires,
                created_by="cli",
            )
        except UnknownScope as exc:
            raise CliError(str(exc)) from None
        record(
            session,
            Actor.system(),
            "keys.create",
            "success",
            target_type="api_key",
            target_id=row.id,
            org_id=row.org_id,
            scopes=row.scopes,
            user_id=user.id,
        )
        out = {**key_view(row), "key": plaintext}
    _emit(args, out, f"{plaintext}\n(key id {row.id}; shown once: store it now)")
    return 0


def keys_list(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (db, _), db.session() as session:
        rows = [key_view(k) for k in session.scalars(select(ApiKey).order_by(ApiKey.created_at))]
    _emit(
        args,
        rows,
        "\n".join(
            f"{k['id']}\t{k['user_id']}\t{','.join(k['scopes'])}\t{'revoked' if k['revoked_at'] else 'active'}"
            for k in rows
        ),
    )
    return 0


def keys_change(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (db, keyring), db.session() as session:
        row = session.get(ApiKey, args.key_id)
        if row is None:
            raise CliError(f"API key {args.key_id!r} does not exist")
        out: dict[str, Any]
        if args.keys_command == "revoke":
            revoke_key(session, row)
            out = key_view(row)
        else:
            plaintext = rotate_key(session, keyring.mac, row, settings.auth.key_rotation_overlap_seconds)
            out = {**key_view(row), "key": plaintext}
        record(
            session,
            Actor.system(),
            f"keys.{args.keys_command}",
            "success",
            target_type="api_key",
            target_id=row.id,
            org_id=row.org_id,
        )
    _emit(args, out, out.get("key") or f"{args.key_id} revoked")
    return 0


def signing_key_rotate(settings: Settings, args: argparse.Namespace) -> int:
    with _open(settings) as (db, keyring):
        kid = TokenService(db, keyring, settings.auth).rotate()
        with db.session() as session:
            record(session, Actor.system(), "signing_keys.rotate", "success", target_type="signing_key", target_id=kid)
    _emit(args, {"kid": kid}, f"new signing key {kid}")
    return 0


def run(func: Any, settings: Settings, args: argparse.Namespace) -> int:
    try:
        return int(func(settings, args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # domain errors (Conflict, InvalidRequest, …) carry a message for people
        message = getattr(exc, "message", None)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
