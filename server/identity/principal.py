"""The authenticated caller, as every route sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from server.audit.service import Actor

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

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    def mfa_fresh(self, max_age_seconds: int, now: float) -> bool:
        return bool(MFA_METHODS & set(self.amr)) and 0 <= now - self.auth_time <= max_age_seconds

    def may_use_model(self, name: str) -> bool:
        return self.models is None or name in self.models

    def may_access_org(self, org_id: str | None) -> bool:
        return self.is_owner or org_id == self.org_id

    def actor(self, client_addr: str | None = None, request_id: str | None = None) -> Actor:
        kind = "key" if self.via == "api_key" else "user"
        who = self.api_key_id if self.via == "api_key" else self.user_id
        return Actor(type=kind, id=who, org_id=self.org_id, client_addr=client_addr, request_id=request_id)
