"""The authenticated caller, as every route sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from server.audit.service import Actor
from server.identity.clients import peer_of
from server.identity.rbac import INSTALLATION_ROLES

MFA_METHODS = frozenset({"otp", "mfa"})


@dataclass(frozen=True)
class Principal:
    user_id: str
    org_id: str
    roles: tuple[str, ...]
    permissions: frozenset[str]
    via: Literal["api_key", "token"]
    scopes: tuple[str, ...]
    amr: tuple[str, ...]
    auth_time: int
    api_key_id: str | None = None
    models: tuple[str, ...] | None = None  # None: every model
    limits: dict[str, Any] = field(default_factory=dict)
    key_created_at: float | None = None
    email: str | None = None

    @property
    def is_owner(self) -> bool:
        """The installation's owner may act across organizations; nobody else may."""
        return "owner" in self.roles

    @property
    def holds_installation_role(self) -> bool:
        """Only installation roles (owner, operator) carry installation permissions (see rbac)."""
        return bool(INSTALLATION_ROLES & set(self.roles))

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    @property
    def interactive(self) -> bool:
        """A session from a password login (a token minted by `grant_type=password`), not an API key or a token
        exchanged for one: only such a session may change the account's sign-in factors."""
        return self.via == "token" and self.api_key_id is None and "pwd" in self.amr

    def mfa_fresh(self, max_age_seconds: int, now: float) -> bool:
        return bool(MFA_METHODS & set(self.amr)) and 0 <= now - self.auth_time <= max_age_seconds

    def may_use_model(self, name: str) -> bool:
        return self.models is None or name in self.models

    def may_access_org(self, org_id: str | None) -> bool:
        return self.is_owner or org_id == self.org_id

    def actor(self, client_addr: str | None = None, request_id: str | None = None) -> Actor:
        """`client_addr` as `server.identity.authn.client_addr` returns it: the TCP peer it carries is recorded too."""
        kind = "key" if self.via == "api_key" else "user"
        who = self.api_key_id if self.via == "api_key" else self.user_id
        address = None if client_addr is None else str.__str__(client_addr)
        return Actor(
            type=kind,
            id=who,
            org_id=self.org_id,
            client_addr=address,
            request_id=request_id,
            peer_addr=peer_of(client_addr),
        )
