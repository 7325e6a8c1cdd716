"""The engines of one server process: one per configured model, each on its pool."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from server.engine.types import Engine, ModelInfo
from server.errors import EngineUnavailable, NotFound
from server.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelInfo], Engine]


def default_engine_factory(settings: Settings, watermark: Callable[[], Any] | None = None) -> EngineFactory:
    """The engine implementation the settings ask for; vLLM is imported only when chosen. `watermark` makes
    the extension every vLLM engine carries (`VllmEngine(watermark=...)`; the app factory passes
    `server.watermark.vllm_adapter.vllm_watermark`)."""
    if settings.engine == "fake":
        from server.engine.fake import FakeEngine

        return lambda info: FakeEngine(info, token_delay=settings.fake_token_delay_seconds)

    def build(info: ModelInfo) -> Engine:
        from server.engine.vllm_engine import VllmEngine

        model = next(m for m in settings.models if m.name == info.name)
        return VllmEngine(info, model, settings.pool(info.pool), watermark=watermark() if watermark else None)

    return build


class EngineHub:
    """Looks engines up by model name; starts and stops them all.

    The hub starts empty and is filled once models are resolved, so the HTTP server can answer /healthz
    (and /readyz with 503) while the engines are still loading.
    """

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self._holds: dict[int, int] = {}  # id(engine) -> responses still using it
        self._retiring: set[Engine] = set()  # replaced engines draining before they stop
        self.start_error: str | None = None
        self.swap_errors: dict[str, str] = {}  # model -> why its newly active version is not served yet

    # -- hot swap --------------------------------------------------------------------------------------
    def hold(self, engine: Engine) -> Hold:
        """Mark `engine` in use by one response until `release()`: a replaced engine stops only when no
        response holds it, so a swap never cuts a request that was admitted on the old version."""
        self._holds[id(engine)] = self._holds.get(id(engine), 0) + 1
        return Hold(self, engine)

    def _release(self, engine: Engine) -> None:
        left = self._holds.get(id(engine), 0) - 1
        if left > 0:
            self._holds[id(engine)] = left
        else:
            self._holds.pop(id(engine), None)

    def holds(self, engine: Engine) -> int:
        return self._holds.get(id(engine), 0)

    def replace(self, engine: Engine) -> Engine | None:
        """Serve `engine` for its model from now on; the engine it replaces (returned) starts retiring."""
        old = self._engines.get(engine.info.name)
        self._engines[engine.info.name] = engine
        self.swap_errors.pop(engine.info.name, None)
        if old is not None:
            self._retiring.add(old)
        return old

    async def retire(self, old: Engine, grace_seconds: float, poll_seconds: float = 0.05) -> bool:
        """Wait until no response holds `old` and it runs nothing (at most `grace_seconds`), then stop it.
        True if it drained; False if the grace ran out and what was left was cancelled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        drained = False
        while loop.time() < deadline:
            stats = old.stats()
            if self.holds(old) == 0 and stats.running == 0 and stats.waiting == 0:
                drained = True
                break
            await asyncio.sleep(poll_seconds)
        if not drained:
            log.warning("engine %s did not drain in %.0f s; stopping it", old.info.fingerprint, grace_seconds)
        try:
            await old.stop()
        finally:
            self._retiring.discard(old)
        return drained

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
        engines = [*self._engines.values(), *self._retiring]
        await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)


class Hold:
    """One response's use of one engine (`EngineHub.hold`); `release` is idempotent."""

    __slots__ = ("_engine", "_hub", "_released")

    def __init__(self, hub: EngineHub, engine: Engine) -> None:
        self._hub, self._engine, self._released = hub, engine, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._hub._release(self._engine)
