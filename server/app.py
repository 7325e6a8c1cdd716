"""The application factory: everything is built here from `Settings` and kept on `app.state`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api.chat.router import router as chat_router
from server.api.chat.serving import ChatService
from server.api.completions.router import router as completions_router
from server.api.completions.serving import CompletionService
from server.api.errors import install_error_handlers
from server.api.health import router as health_router
from server.api.models_router import router as models_router
from server.engine.hub import EngineFactory, EngineHub, default_engine_factory
from server.engine.types import ModelInfo
from server.observability.metrics import Metrics, MetricsMiddleware
from server.settings import Settings
from server.storage.db import Database

log = logging.getLogger(__name__)

Resolver = Callable[[Settings, Database], list[ModelInfo]]


def resolve_configured_models(settings: Settings, db: Database) -> list[ModelInfo]:
    from server.registry.versions import resolve_model

    return [resolve_model(settings, model, db) for model in settings.models]


def create_app(
    settings: Settings,
    *,
    engine_factory: EngineFactory | None = None,
    resolver: Resolver | None = None,
    migrate: bool = True,
) -> FastAPI:
    """Build the server. Engines load in the background after start; /readyz turns 200 once they are up."""
    db = Database(settings.sqlalchemy_url)
    hub = EngineHub()
    metrics = Metrics()
    metrics.watch_engines(lambda: hub.engines)
    factory = engine_factory or default_engine_factory(settings)
    resolve = resolver or resolve_configured_models

    async def boot() -> None:
        try:
            if migrate:
                from server.storage.migrate import upgrade

                await asyncio.to_thread(upgrade, settings.sqlalchemy_url)
            infos = await asyncio.to_thread(resolve, settings, db)
            for info in infos:
                hub.add(await asyncio.to_thread(factory, info))
            await hub.start()
        except Exception as exc:
            hub.start_error = f"{type(exc).__name__}: {exc}"
            log.exception("the server could not start its engines; /readyz reports why")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.boot = asyncio.create_task(boot())
        try:
            yield
        finally:
            app.state.boot.cancel()
            await asyncio.gather(app.state.boot, return_exceptions=True)
            await hub.stop()
            db.dispose()

    app = FastAPI(
        title="Secure model server", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.settings = settings
    app.state.db = db
    app.state.hub = hub
    app.state.metrics = metrics
    app.state.chat = ChatService(hub, settings.limits, metrics)
    app.state.completions = CompletionService(hub, settings.limits, metrics)
    for router in (health_router, models_router, chat_router, completions_router):
        app.include_router(router)
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
