"""The application factory: everything is built here from `Settings` and kept on `app.state`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from server.api.chat.router import router as chat_router
from server.api.chat.serving import ChatService
from server.api.completions.router import router as completions_router
from server.api.completions.serving import CompletionService
from server.api.errors import install_error_handlers
from server.api.health import metrics_router
from server.api.health import router as health_router
from server.api.models_router import router as models_router
from server.audit.routes import router as audit_router
from server.audit.sink import AuditSink
from server.engine.hub import EngineFactory, EngineHub, default_engine_factory
from server.engine.pool_control import PoolControl
from server.engine.swap import ModelSwapper
from server.engine.types import ModelInfo
from server.identity.admin_routes import router as admin_router
from server.identity.auth_routes import router as auth_router
from server.identity.authn import Authenticator
from server.identity.authz import check_route_declarations
from server.identity.lockout import LoginLockout
from server.identity.login import LoginService
from server.identity.passwords import PasswordHasher
from server.identity.secrets import Keyring, load_master_secret
from server.identity.service import ensure_builtin_roles
from server.identity.tokens import TokenService
from server.identity.totp import TotpService
from server.observability.metrics import Metrics, MetricsMiddleware
from server.policy.admission import Admitter
from server.policy.gatekeeper import Gatekeeper
from server.policy.pool_gate import PoolGate
from server.policy.risk import RiskSignals
from server.policy.routes import router as policy_router
from server.policy.store import make_store
from server.registry.routes import router as registry_router
from server.settings import Settings
from server.storage.db import Database
from server.watermark.admin_routes import router as watermark_admin_router
from server.watermark.keys import WatermarkKeyring
from server.watermark.marking import RequestMarker
from server.watermark.routes import router as watermark_router
from server.watermark.vllm_adapter import vllm_watermark

log = logging.getLogger(__name__)

Resolver = Callable[[Settings, Database], list[ModelInfo]]
_SIGNING_KEY_CHECK_SECONDS = 300


def resolve_configured_models(settings: Settings, db: Database) -> list[ModelInfo]:
    """Each configured model's active, signature-verified version (see server/registry/loader.py)."""
    if settings.engine == "fake":
        from server.engine.fake import fake_model_info

        return [fake_model_info(m.name, m.pool, m.max_model_len) for m in settings.models]
    from server.registry.loader import load_verified

    return [load_verified(settings, model, db).info for model in settings.models]


def _model_swapper(
    settings: Settings, db: Database, hub: EngineHub, factory: EngineFactory, audit: AuditSink
) -> ModelSwapper | None:
    """Hot swap on promote/rollback for registry-backed engines (the fake engine has no registry)."""
    if settings.engine == "fake":
        return None
    from server.registry.loader import active_digests, load_verified

    return ModelSwapper(
        hub,
        settings.models,
        lambda: active_digests(settings, db),
        lambda model: load_verified(settings, model, db, progress=False).info,
        factory,
        audit,
        grace_seconds=settings.shutdown_grace_seconds,
    )


@dataclass
class Identity:
    """The identity services of one app, built from settings."""

    keyring: Keyring
    hasher: PasswordHasher
    tokens: TokenService
    totp: TotpService
    login: LoginService
    authenticator: Authenticator

    @classmethod
    def build(
        cls, settings: Settings, db: Database, audit: AuditSink, hasher: PasswordHasher | None = None
    ) -> Identity:
        keyring = Keyring(load_master_secret(settings))
        auth = settings.auth
        hasher = hasher or PasswordHasher()
        tokens = TokenService(db, keyring, auth)
        totp = TotpService(keyring, issuer=auth.issuer)
        login = LoginService(db, hasher, LoginLockout.from_settings(auth), totp, tokens, auth, audit)
        return cls(keyring, hasher, tokens, totp, login, Authenticator(db, keyring, tokens, auth, audit))

    def prepare(self, db: Database) -> None:
        """Blocking start-up work: built-in roles and a signing key exist."""
        with db.session() as session:
            ensure_builtin_roles(session)
        self.tokens.ensure_signing_key()
        self.authenticator.poll()


def build_gatekeeper(settings: Settings, db: Database, audit: AuditSink) -> Gatekeeper:
    """Admission: the limit store chosen by URL, one fair gate per pool, risk signals."""
    adm = settings.admission
    store = make_store(adm.store_url, lease_seconds=adm.lease_seconds)
    gates = {
        p.name: PoolGate(p.name, p.max_concurrency, p.per_key_concurrency, p.queue_length, p.queue_timeout_seconds)
        for p in settings.pools
    }
    return Gatekeeper(Admitter(store, gates), adm, RiskSignals(db, adm), audit, db)


def create_app(
    settings: Settings,
    *,
    engine_factory: EngineFactory | None = None,
    resolver: Resolver | None = None,
    migrate: bool = True,
    password_hasher: PasswordHasher | None = None,
) -> FastAPI:
    """Build the server. Engines load in the background after start; /readyz turns 200 once they are up."""
    db = Database(settings.sqlalchemy_url)
    hub = EngineHub()
    metrics = Metrics()
    metrics.watch_engines(lambda: hub.engines)
    audit_sink = AuditSink(
        db, failure_interval=settings.audit.failure_interval_seconds, failure_max_rows=settings.audit.failure_max_rows
    )
    identity = Identity.build(settings, db, audit_sink, password_hasher)
    gatekeeper = build_gatekeeper(settings, db, audit_sink)
    pool_control = PoolControl(db, [p.name for p in settings.pools], gatekeeper.apply_pool_state)
    watermark_keys = WatermarkKeyring(db, identity.keyring, settings.watermark)
    factory = engine_factory or default_engine_factory(settings, watermark=vllm_watermark)
    resolve = resolver or resolve_configured_models
    swapper = _model_swapper(settings, db, hub, factory, audit_sink) if resolver is None else None

    async def boot_engines() -> None:
        try:
            infos = await asyncio.to_thread(resolve, settings, db)
            for info in infos:
                hub.add(await asyncio.to_thread(factory, info))
            await hub.start()
            for info in infos:  # the engines have read their weights: were they the verified bytes?
                if info.integrity_check is not None:
                    await asyncio.to_thread(info.integrity_check)
        except Exception as exc:
            hub.start_error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            log.exception("the server could not start its engines; /readyz reports why")
            await hub.stop()  # fail closed: nothing is served from an engine that did not verify

    async def rotate_signing_keys() -> None:
        while True:
            await asyncio.sleep(_SIGNING_KEY_CHECK_SECONDS)
            try:
                await asyncio.to_thread(identity.tokens.maybe_rotate)
            except Exception:
                log.exception("signing key rotation check failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            from server.storage.migrate import upgrade

            await asyncio.to_thread(upgrade, settings.sqlalchemy_url)
        await asyncio.to_thread(identity.prepare, db)
        await asyncio.to_thread(watermark_keys.ensure_default_key)
        await asyncio.to_thread(pool_control.refresh)
        await asyncio.to_thread(gatekeeper.refresh)
        identity.authenticator.start()
        audit_sink.start()
        gatekeeper.start()
        gatekeeper.risk.start()
        pool_control.start()
        tasks = [asyncio.create_task(boot_engines()), asyncio.create_task(rotate_signing_keys())]
        app.state.boot = tasks[0]
        if swapper is not None:
            swapper.start()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if swapper is not None:
                await swapper.stop()
            await hub.stop()
            await pool_control.stop()
            await gatekeeper.risk.stop()
            await gatekeeper.stop()
            await identity.authenticator.stop()
            await audit_sink.stop()
            db.dispose()

    app = FastAPI(
        title="Secure model server", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    state = app.state
    state.settings, state.db, state.hub, state.metrics, state.audit_sink = settings, db, hub, metrics, audit_sink
    state.keyring, state.hasher, state.tokens = identity.keyring, identity.hasher, identity.tokens
    state.totp, state.login, state.authenticator = identity.totp, identity.login, identity.authenticator
    state.gatekeeper, state.pool_control, state.swapper = gatekeeper, pool_control, swapper
    state.watermark_keys = watermark_keys
    marker = RequestMarker(watermark_keys)
    state.chat = ChatService(hub, settings.limits, metrics, gatekeeper, marker)
    state.completions = CompletionService(hub, settings.limits, metrics, gatekeeper, marker)
    for router in (
        health_router,
        metrics_router(settings.auth.metrics_public),
        models_router,
        chat_router,
        completions_router,
        auth_router,
        admin_router,
        audit_router,
        policy_router,
        registry_router,
        watermark_router,
        watermark_admin_router,
    ):
        app.include_router(router)
    check_route_declarations(app)
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
