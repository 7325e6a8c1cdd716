"""Authentication on the request path: API keys and JWTs, with a cache that revocation empties in time.

The cache maps HMAC(key) to the key's record (and user id to roles). Every replica polls one counter row
(`change_counters.credentials`) that each revocation, rotation, role or user change increments in its own
transaction; when it moves, the cache is dropped. A cache whose last successful poll is older than half
the revocation bound is not trusted: the request polls first, and if the database cannot answer, the
request fails closed with 503. So a revoked key is refused on every replica within
`auth.revocation_max_delay_seconds` (1 s by default).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import update
from starlette.requests import Request

from server.audit.sink import AuditSink
from server.errors import AuthUnavailable, Unauthenticated
from server.identity.apikeys import KeyRecord, aware, credentials_epoch, load_key, parse_key, user_roles
from server.identity.clients import ClientAddress, ProxyTrust, anonymous_actor
from server.identity.models import ApiKey, Organization, User
from server.identity.principal import Principal
from server.identity.rbac import UnknownScope, expand_scopes
from server.identity.secrets import Keyring
from server.identity.tokens import InvalidToken, TokenService
from server.settings import AuthSettings
from server.storage.db import Database

log = logging.getLogger(__name__)

_MAX_ENTRIES = 100_000
_LAST_USED_EVERY = 60.0
_UNRESOLVED = object()


@dataclass(frozen=True)
class UserRecord:
    org_id: str
    roles: tuple[str, ...]
    permissions: frozenset[str]
    active: bool
    email: str | None = None


class Authenticator:
    def __init__(
        self, db: Database, keyring: Keyring, tokens: TokenService, settings: AuthSettings, audit: AuditSink
    ) -> None:
        self._db = db
        self._keyring = keyring
        self._tokens = tokens
        self._settings = settings
        self._audit = audit
        self._keys: OrderedDict[str, KeyRecord] = OrderedDict()
        self._key_active: dict[str, bool] = {}
        self._users: dict[str, UserRecord] = {}
        self._epoch: int | None = None
        self._polled_at = 0.0
        self._last_used: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    # -- freshness ------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Read the credentials counter; drop the caches when it moved. Runs in a worker thread."""
        with self._db.session() as session:
            epoch = credentials_epoch(session)
        if epoch != self._epoch:
            self.invalidate()
            self._epoch = epoch
        self._polled_at = time.monotonic()

    def invalidate(self) -> None:
        """Drop the caches now (this process just changed credentials; others learn it from the counter)."""
        self._keys.clear()
        self._key_active.clear()
        self._users.clear()
        self._epoch = None

    async def _ensure_fresh(self) -> None:
        if time.monotonic() - self._polled_at <= self._settings.revocation_max_delay_seconds / 2:
            return
        try:
            await asyncio.to_thread(self.poll)
        except Exception as exc:
            log.error("credential check unavailable: %s", exc)
            raise AuthUnavailable(
                "Credentials cannot be checked right now (the identity database is unreachable); retry shortly.",
                headers={"Retry-After": "2"},
            ) from None

    async def run(self) -> None:
        interval = self._settings.revocation_max_delay_seconds / 4
        while True:
            try:
                await asyncio.to_thread(self.poll)
            except Exception as exc:
                log.warning("credentials poll failed: %s", exc)
            await asyncio.sleep(interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- entry point ----------------------------------------------------------------------------------
    async def authenticate(self, request: Request) -> Principal:
        address = client_addr(request)
        header = request.headers.get("authorization")
        try:
            if not header:
                raise Unauthenticated(
                    "No credentials: send `Authorization: Bearer <API key or token>`.", code="missing_credentials"
                )
            scheme, _, value = header.partition(" ")
            value = value.strip()
            if scheme.lower() != "bearer" or not value or " " in value:
                raise Unauthenticated(
                    "Malformed Authorization header: use `Bearer <API key or token>`.", code="malformed_credentials"
                )
            await self._ensure_fresh()
            principal = await (self._from_key(value) if value.startswith("sk-") else self._from_token(value))
        except Unauthenticated as exc:
            # Anyone can cause these: tallied, not one row each (server/audit/failures.py).
            self._audit.failure(anonymous_actor(address), "authn", exc.code or "invalid", path=request.url.path)
            raise
        self._audit.submit(principal.actor(address), "authn", "success", via=principal.via, path=request.url.path)
        return principal

    # -- API keys -------------------------------------------------------------------------------------
    async def _from_key(self, value: str) -> Principal:
        if parse_key(value) is None:
            raise Unauthenticated("Invalid API key.", code="invalid_api_key")
        mac = self._keyring.mac(value)
        record = self._keys.get(mac)
        if record is None:
            record = await asyncio.to_thread(self._load_key, mac)
        now = datetime.now(UTC)
        if record is None or not record.active:
            raise Unauthenticated("Invalid or revoked API key.", code="invalid_api_key")
        if record.expires_at is not None and record.expires_at <= now:
            raise Unauthenticated("This API key has expired; create or rotate a key.", code="expired_api_key")
        self._touch(record.id)
        return Principal(
            user_id=record.user_id,
            org_id=record.org_id,
            roles=record.roles,
            permissions=record.role_permissions & expand_scopes(record.scopes),
            via="api_key",
            scopes=record.scopes,
            amr=("key",),
            auth_time=int(time.time()),
            api_key_id=record.id,
            models=record.models,
            limits=record.limits,
            key_created_at=record.created_at.timestamp(),
            email=record.email,
        )

    def _load_key(self, mac: str) -> KeyRecord | None:
        epoch = self._epoch
        with self._db.session() as session:
            record = load_key(session, mac)
        if record is not None and epoch == self._epoch:  # do not cache across an invalidation
            self._keys[mac] = record
            if len(self._keys) > _MAX_ENTRIES:
                self._keys.popitem(last=False)
        return record

    def _touch(self, key_id: str) -> None:
        """Write-behind `last_used_at`, at most once a minute per key per replica."""
        now = time.monotonic()
        if now - self._last_used.get(key_id, -_LAST_USED_EVERY) < _LAST_USED_EVERY:
            return
        self._last_used[key_id] = now

        def write() -> None:
            try:
                with self._db.session() as session:
                    session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=datetime.now(UTC)))
            except Exception as exc:
                log.warning("could not record last use of key %s: %s", key_id, exc)

        asyncio.get_running_loop().run_in_executor(None, write)

    # -- tokens ---------------------------------------------------------------------------------------
    async def _from_token(self, value: str) -> Principal:
        try:
            claims = self._tokens.decode(value)
        except InvalidToken as exc:
            raise Unauthenticated(
                f"Invalid token ({exc.reason}); obtain a new one from /v1/auth/token.", code="invalid_token"
            ) from None
        user = self._users.get(claims.sub) or await asyncio.to_thread(self._load_user, claims.sub)
        if user is None or not user.active or user.org_id != claims.org:
            raise Unauthenticated("The token's user is disabled or unknown.", code="invalid_token")
        if claims.key_id is not None and not await self._key_still_active(claims.key_id):
            raise Unauthenticated("The API key this token was issued for has been revoked.", code="invalid_token")
        try:
            permissions = user.permissions & expand_scopes(claims.scopes)
        except UnknownScope:
            raise Unauthenticated("The token carries an unknown scope.", code="invalid_token") from None
        return Principal(
            user_id=claims.sub,
            org_id=claims.org,
            roles=user.roles,
            permissions=permissions,
            via="token",
            scopes=tuple(claims.scopes),
            amr=tuple(claims.amr),
            auth_time=claims.auth_time,
            api_key_id=claims.key_id,
            email=user.email,
        )

    def _load_user(self, user_id: str) -> UserRecord | None:
        epoch = self._epoch
        with self._db.session() as session:
            user = session.get(User, user_id)
            if user is None:
                return None
            org = session.get(Organization, user.org_id)
            roles, perms = user_roles(session, user_id)
            record = UserRecord(
                org_id=user.org_id,
                roles=roles,
                permissions=perms,
                active=not user.disabled and org is not None and not org.disabled,
                email=user.email,
            )
        if epoch == self._epoch:
            self._users[user_id] = record
        return record

    async def _key_still_active(self, key_id: str) -> bool:
        cached = self._key_active.get(key_id)
        if cached is not None:
            return cached

        def load() -> bool:
            epoch = self._epoch
            with self._db.session() as session:
                row = session.get(ApiKey, key_id)
                expires = aware(row.expires_at) if row is not None else None
                active = row is not None and row.revoked_at is None and (expires is None or expires > datetime.now(UTC))
            if epoch == self._epoch:
                self._key_active[key_id] = active
            return active

        return await asyncio.to_thread(load)


def client_addr(request: Request) -> ClientAddress | None:
    """The client's address: the TCP peer, or what a trusted proxy forwarded (server/identity/clients.py).

    A `str` carrying the peer too; resolved once per request."""
    cached: Any = getattr(request.state, "client_address", _UNRESOLVED)
    if cached is not _UNRESOLVED:
        return cast(ClientAddress | None, cached)
    state = request.app.state
    trust = getattr(state, "proxy_trust", None)
    if trust is None:
        network = state.settings.network
        trust = state.proxy_trust = ProxyTrust(network.trusted_proxies, network.forwarded_header)
    address = trust.resolve(request.client.host if request.client else None, request.headers)
    request.state.client_address = address
    return address


def principal_of(request: Request) -> Principal:
    principal: Any = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise Unauthenticated("No credentials.", code="missing_credentials")
    return principal
