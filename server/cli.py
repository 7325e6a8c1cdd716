"""`python -m server …`: the operator's command line. Every subcommand has --help."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

from server.settings import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    return load_settings(args.config, **overrides)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.storage.migrate import upgrade

    settings = _settings(args)
    _logging(settings.log_level)
    upgrade(settings.sqlalchemy_url)
    app = create_app(settings, migrate=False)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
        access_log=False,
    )
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from server.storage.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.sqlalchemy_url, args.revision)
    print(f"database at {_redact(settings.sqlalchemy_url)} is at revision {args.revision}")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    from server.storage.db import Database
    from server.storage.migrate import current_revision, head_revision

    settings = _settings(args)
    db = Database(settings.sqlalchemy_url)
    try:
        print(json.dumps({"current": current_revision(db), "head": head_revision(settings.sqlalchemy_url)}))
    finally:
        db.dispose()
    return 0


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server", description="Secure OpenAI-compatible model server")
    parser.add_argument("--config", type=Path, help="extra TOML config file (also $SERVER_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help_text: str, parent: argparse._SubParsersAction = sub
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    serve = add("serve", cmd_serve, "migrate the database, then serve the API (engines load in the background)")
    serve.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default from config: 8000)")

    db = sub.add_parser("db", help="database migrations", description="database migrations")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = add("upgrade", cmd_db_upgrade, "apply migrations up to a revision", db_sub)
    upgrade.add_argument("revision", nargs="?", default="head")
    add("current", cmd_db_current, "print the current and head revisions as JSON", db_sub)

    models = sub.add_parser("models", help="signed model versions", description="signed model versions")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    from server.registry import cli as registry

    registry.add_commands(models_sub, lambda func: lambda args: registry.run(func, _settings(args), args))

    _add_identity_commands(sub, add)
    _add_watermark_commands(sub, add)
    _add_limits_commands(sub, add)

    routes = add(
        "routes", cmd_routes, "list every route with its required permission and its scope (installation/organization)"
    )
    routes.add_argument("--json", action="store_true", help="print as JSON")
    return parser


def _bind(func: Callable[..., int]) -> Callable[[argparse.Namespace], int]:
    """A command that opens the database through the identity CLI's runner (`identity.cli.run`)."""
    from server.identity.cli import run

    return lambda args: run(func, _settings(args), args)


def _add_identity_commands(sub: argparse._SubParsersAction, add: Callable[..., argparse.ArgumentParser]) -> None:
    from server.identity import cli as identity

    admin = sub.add_parser("admin", help="installation administration", description="installation administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    boot = add(
        "bootstrap",
        _bind(identity.bootstrap),
        "create the first organization and its owner (once); prints "
        "the one-time password, TOTP provisioning URI and recovery codes once",
        admin_sub,
    )
    boot.add_argument("--org", default="default", help="organization name (default: default)")
    boot.add_argument("--email", default="owner@example.com", help="owner email")
    boot.add_argument("--json", action="store_true", help="print as JSON")

    orgs = sub.add_parser("orgs", help="organizations", description="organizations")
    orgs_sub = orgs.add_subparsers(dest="orgs_command", required=True)
    oc = add("create", _bind(identity.orgs_create), "create an organization", orgs_sub)
    oc.add_argument("name")
    oc.add_argument("--json", action="store_true")
    add("list", _bind(identity.orgs_list), "list organizations", orgs_sub).add_argument("--json", action="store_true")

    users = sub.add_parser("users", help="users", description="users")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    uc = add("create", _bind(identity.users_create), "create a user", users_sub)
    uc.add_argument("--email", required=True)
    uc.add_argument("--roles", default="developer", help="comma-separated roles (default: developer)")
    uc.add_argument("--org", help="organization id (default: the operator's)")
    uc.add_argument("--password", action="store_true", help="generate a one-time password and print it")
    uc.add_argument("--json", action="store_true")
    ul = add("list", _bind(identity.users_list), "list users", users_sub)
    ul.add_argument("--json", action="store_true")

    keys = sub.add_parser("keys", help="API keys", description="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kc = add("create", _bind(identity.keys_create), "create an API key (printed once)", keys_sub)
    kc.add_argument("--scopes", default="inference", help="comma-separated scopes (default: inference)")
    kc.add_argument("--user", help="owner user id (default: the operator service account)")
    kc.add_argument("--name", default="", help="a label")
    kc.add_argument("--models", help="comma-separated model allowlist (default: all)")
    kc.add_argument("--expires-days", type=float, help="expire after this many days")
    kc.add_argument("--json", action="store_true")
    kl = add("list", _bind(identity.keys_list), "list API keys (never their secrets)", keys_sub)
    kl.add_argument("--json", action="store_true")
    for verb, text in (
        ("revoke", "revoke a key on every replica within a second"),
        ("rotate", "new secret for a key; the old one works for the overlap window"),
    ):
        kv = add(verb, _bind(identity.keys_change), text, keys_sub)
        kv.add_argument("key_id")
        kv.add_argument("--json", action="store_true")

    auth = sub.add_parser("auth", help="token signing keys", description="token signing keys")
    auth_sub = auth.add_subparsers(dest="auth_command", required=True)
    rot = add("rotate-signing-key", _bind(identity.signing_key_rotate), "rotate the JWT signing key", auth_sub)
    rot.add_argument("--json", action="store_true")


def _add_watermark_commands(sub: argparse._SubParsersAction, add: Callable[..., argparse.ArgumentParser]) -> None:
    from server.watermark import cli as wm

    group = sub.add_parser("watermark", help="watermark keys and detection", description="watermark keys and detection")
    wm_sub = group.add_subparsers(dest="watermark_command", required=True)
    detect = add(
        "detect",
        lambda a: wm.detect_cli(_settings(a), a.model, a.file, org_id=a.org),
        "detect a watermark in a text file (exit 0 detected, 1 not, 2 unreadable); prints JSON",
        wm_sub,
    )
    detect.add_argument("--model", required=True, help="the configured model whose tokenizer generated the text")
    detect.add_argument("--file", required=True, help="text file, or - for standard input")
    detect.add_argument("--org", help="try only what this organization's API callers may (default: every key)")
    add("keys", lambda a: wm.manage_cli(_settings(a), "keys"), "list watermark keys and exemptions", wm_sub)
    rotate = add(
        "rotate",
        lambda a: wm.manage_cli(_settings(a), "rotate", org_id=a.org, reason=a.reason),
        "retire the active key and create a new one (retired keys stay for detection)",
        wm_sub,
    )
    rotate.add_argument("--org", help="organization id (default: the deployment default key)")
    rotate.add_argument("--reason", default="")
    for verb, text in (("exempt", "stop watermarking an API key's responses"), ("unexempt", "watermark them again")):
        p = add(
            verb,
            lambda a, verb=verb: wm.manage_cli(_settings(a), verb, api_key_id=a.key_id, reason=a.reason),
            text,
            wm_sub,
        )
        p.add_argument("key_id")
        p.add_argument("--reason", default="", required=verb == "exempt")


def _add_limits_commands(sub: argparse._SubParsersAction, add: Callable[..., argparse.ArgumentParser]) -> None:
    from server.policy import cli as limits

    group = sub.add_parser("limits", help="limits of a key, user or org", description="limits of a key, user or org")
    limits_sub = group.add_subparsers(dest="limits_command", required=True)
    scope_help = "key:<id>, user:<id> or org:<id>"
    show = add("show", _bind(limits.show), "a scope's limits (and usage with Redis)", limits_sub)
    show.add_argument("scope", help=scope_help)
    show.add_argument("--json", action="store_true")
    put = add(
        "set",
        _bind(limits.set_limits),
        "replace a scope's limits (audited); limits not given are removed from the scope",
        limits_sub,
    )
    put.add_argument("scope", help=scope_help)
    for name, text in (
        ("rpm", "requests per minute"),
        ("tpm", "tokens per minute"),
        ("tpd", "tokens per UTC day"),
        ("concurrent", "requests in flight"),
    ):
        put.add_argument(f"--{name}", type=int, metavar="N", help=text)
    put.add_argument("--reason", default="", help="recorded in the audit event")
    put.add_argument("--json", action="store_true")


def cmd_routes(args: argparse.Namespace) -> int:
    from server.app import create_app
    from server.identity.authz import route_table

    settings = _settings(args)
    rows = route_table(create_app(settings, migrate=False))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{','.join(row['methods']):8s} {row['path']:45s} {row['permission']:20s} {row['scope']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
