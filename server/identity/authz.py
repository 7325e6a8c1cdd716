"""Route permissions, deny by default.

Every route declares exactly one `Requires(permission)` dependency (or `Requires(PUBLIC)`);
`check_route_declarations` refuses to build an app with an undeclared route, and a test enumerates the
routes too. The dependency authenticates, checks the permission, enforces the MFA step-up for privileged
permissions and audits denials. A route whose permission has installation scope (`rbac.CATALOG`) also
checks that the caller holds an installation role: organization roles cannot hold such permissions in the
first place, and this check makes sure that stays true at the door too. `route_table` shows each route's
scope (`python -m server routes`).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request

from server.errors import PermissionDenied, StepUpRequired
from server.identity.authn import client_addr
from server.identity.principal import Principal
from server.identity.rbac import INSTALLATION, PERMISSIONS, PUBLIC, STEP_UP, permission_scope


class Requires:
    def __init__(self, permission: str) -> None:
        if permission != PUBLIC and permission not in PERMISSIONS:
            raise ValueError(f"unknown permission {permission!r}")
        self.permission = permission
        self.step_up = permission in STEP_UP
        self.scope = permission_scope(permission)

    async def __call__(self, request: Request) -> Principal | None:
        if self.permission == PUBLIC:
            return None
        state = request.app.state
        principal = await state.authenticator.authenticate(request)
        request.state.principal = principal
        allowed = principal.can(self.permission)
        if self.scope == INSTALLATION and not principal.holds_installation_role:
            allowed = False
        if not allowed:
            state.audit_sink.submit(
                principal.actor(client_addr(request)),
                "authz",
                "denied",
                permission=self.permission,
                path=request.url.path,
            )
            raise PermissionDenied(
                f"This credential lacks the {self.permission!r} permission "
                f"(scopes: {', '.join(principal.scopes) or 'none'})."
            )
        if self.step_up and not principal.mfa_fresh(state.settings.auth.step_up_max_age_seconds, time.time()):
            state.audit_sink.submit(
                principal.actor(client_addr(request)),
                "authz",
                "denied",
                permission=self.permission,
                reason="step_up",
                path=request.url.path,
            )
            raise StepUpRequired(
                f"{self.permission!r} needs a recent second factor: get a token from "
                "/v1/auth/token with your password and TOTP code, then retry with it."
            )
        return principal

    def __repr__(self) -> str:
        return f"Requires({self.permission!r})"


def requires(permission: str) -> Any:
    """Use as `dependencies=[requires("inference")]` on a route."""
    return Depends(Requires(permission))


def route_permission(route: APIRoute) -> str | None:
    found = [d.dependency.permission for d in route.dependencies if isinstance(d.dependency, Requires)]
    return found[0] if len(found) == 1 else None


def route_table(app: FastAPI) -> list[dict[str, Any]]:
    """Every route with its permission and that permission's scope of authority (installation, organization,
    or public)."""
    rows = []
    for route in app.routes:
        if isinstance(route, APIRoute):
            permission = route_permission(route)
            scope = None if permission is None else (permission_scope(permission) or PUBLIC)
            rows.append(
                {"path": route.path, "methods": sorted(route.methods), "permission": permission, "scope": scope}
            )
    return sorted(rows, key=lambda r: (r["path"], r["methods"]))


def check_route_declarations(app: FastAPI) -> None:
    """Deny by default: an app with a route that declares no permission is not built."""
    undeclared = [
        f"{sorted(r.methods)} {r.path}" for r in app.routes if isinstance(r, APIRoute) and route_permission(r) is None
    ]
    non_api = [getattr(r, "path", repr(r)) for r in app.routes if not isinstance(r, APIRoute)]
    if undeclared or non_api:
        raise RuntimeError(f"routes without a permission declaration: {undeclared + non_api}")
