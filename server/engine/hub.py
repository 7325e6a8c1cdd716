"""The engines of one server process: one per configured model, each on its pool."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from server.engine.types import Engine, ModelInfo
from server.errors import EngineUnavailable, NotFound
from server.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelInfo], Engine]


def default_engine_factory(settings: Settings) -> EngineFactory:
    """The engine implementation the settings ask for; vLLM is imported only when chosen."""
    if settings.engine == "fake":
        from server.engine.fake import FakeEngine

        return lambda info: FakeEngine(info, token_delay=settings.fake_token_delay_seconds)

    def build(info: ModelInfo) -> Engine:
        from server.engine.vllm_engine import VllmEngine

        model = next(m for m in settings.models if m.name == info.name)
        return VllmEngine(info, model, settings.pool(info.pool))

    return build


class EngineHub:
    """Looks engines up by model name; starts and stops them all.

    The hub starts empty and is filled once models are resolved, so the HTTP server can answer /healthz
    (and /readyz with 503) while the engines are still loading.
    """

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self.start_error: str | None = None

    def add(self, engine: Engine) -> None:
        if engine.info.name in self._engines:
            raise ValueError(f"model {engine.info.name!r} already has an engine")
        self._engines[engine.info.name] = engine

    @property
    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def models(self) -> list[ModelInfo]:
        return [e.info for e in self._engines.values()]

    def get(self, name: str) -> Engine:
        engine = self._engines.get(name)
        if engine is None:
            raise NotFound(
                f"The model {name!r} does not exist. GET /v1/models lists the models this server serves.",
                param="model",
                code="model_not_found",
            )
        if not engine.ready():
            raise EngineUnavailable(
                f"The model {name!r} is starting or stopping; retry shortly.", headers={"Retry-After": "5"}
            )
        return engine

    def ready(self) -> bool:
        return bool(self._engines) and self.start_error is None and all(e.ready() for e in self._engines.values())

    async def start(self) -> None:
        for engine in self._engines.values():
            await engine.start()

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self._engines.values()), return_exceptions=True)
