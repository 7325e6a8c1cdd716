"""Who may grant what. No principal grants more than it holds, nor anything outside its scope of authority.

Every grant path of the admin API goes through one of these checks (`GrantRefused`, 403, otherwise):

    create a key        the new key's permissions (its scopes ∩ its owner's roles) lie within the creator's
                        effective permissions, and every permission named as a scope is one the creator holds;
                        a key for someone else may name only scopes within the creator's permissions, so it
                        cannot grow later when its owner gains roles (the creator has seen its secret)
    rotate a key        the key's permissions lie within the caller's (rotation hands over its secret)
    create a role       organization permissions only, each held by the creator
    assign roles        `roles:write` with step-up (route), and both the user's current permissions and the
                        new roles' lie within the assigner's; the owner role only by an owner
    create a user       with roles: the same as assigning them
    act on a user       (disable, revoke their keys, change their limits) only a user whose permissions lie
                        within the actor's, so an organization admin cannot lock out the installation's owner

A principal's permissions here are its effective ones (`Principal.permissions`: roles ∩ the credential's
scopes), so a narrowly scoped key cannot grant what its owner's roles would allow.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.errors import GrantRefused
from server.identity.principal import Principal
from server.identity.rbac import INSTALLATION_PERMISSIONS, PERMISSIONS, expand_scopes


def _names(permissions: Iterable[str]) -> str:
    return ", ".join(sorted(permissions))


def check_key_grant(
    creator: Principal, scopes: list[str], owner_permissions: frozenset[str], *, for_self: bool
) -> None:
    """May `creator` create a key with `scopes` for a user whose roles grant `owner_permissions`?

    Raises UnknownScope for a scope that does not exist."""
    requested = expand_scopes(scopes)
    named = {s for s in scopes if s in PERMISSIONS}  # 'inference' and 'finetune' name permissions too
    unheld_names = named - creator.permissions
    if unheld_names:
        raise GrantRefused(
            f"A key cannot carry permissions this credential does not hold: {_names(unheld_names)}.", param="scopes"
        )
    exceeding = (requested & owner_permissions) - creator.permissions
    if exceeding:
        raise GrantRefused(
            f"That key would be able to do more than this credential can ({_names(exceeding)}); "
            "ask for narrower scopes.",
            param="scopes",
        )
    if not for_self and not requested <= creator.permissions:
        raise GrantRefused(
            "A key for another user may only name scopes within your own permissions "
            f"(not: {_names(requested - creator.permissions)}).",
            param="scopes",
        )


def check_role_contents(creator: Principal, permissions: Iterable[str]) -> None:
    """May `creator` create a custom (organization) role with `permissions`? (Unknown names are the service's
    400, not a grant question.)"""
    wanted = frozenset(permissions) & frozenset(PERMISSIONS)
    installation = wanted & INSTALLATION_PERMISSIONS
    if installation:
        raise GrantRefused(
            f"Organization roles cannot hold installation permissions: {_names(installation)}.",
            param="permissions",
            code="installation_permission",
        )
    unheld = wanted - creator.permissions
    if unheld:
        raise GrantRefused(f"A role cannot grant permissions you do not hold: {_names(unheld)}.", param="permissions")


def check_assignment(
    assigner: Principal, roles: Iterable[str], granted: frozenset[str], current: frozenset[str]
) -> None:
    """May `assigner` give a user the roles `roles` (granting `granted`), replacing roles granting `current`?"""
    if "owner" in roles and not assigner.is_owner:
        raise GrantRefused("Only the installation's owner can grant the owner role.", param="roles")
    unheld = granted - assigner.permissions
    if unheld:
        raise GrantRefused(f"These roles grant permissions you do not hold: {_names(unheld)}.", param="roles")
    check_may_manage(assigner, current, "Changing the roles of this user")


def check_may_manage(actor: Principal, target_permissions: frozenset[str], what: str) -> None:
    """`actor` may act on a user (or key) only if what that user (or key) can do lies within its own powers."""
    beyond = target_permissions - actor.permissions
    if beyond:
        raise GrantRefused(f"{what} needs every permission it holds ({_names(beyond)}).")
