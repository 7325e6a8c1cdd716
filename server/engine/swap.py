"""Hot swap: each replica follows its models' active versions and replaces engines without dropping requests.

Promotion and rollback only move the registry's alias (`server.registry.catalog`). Every replica polls the
active digest of each configured model (one small query a second, and at once after this replica's own
promote/rollback: `poke`). When it differs from what the hub serves, the swapper:

1. resolves the new active version through the same verify-before-load path as start-up (signature checked
   with pinned signers; a version that does not verify is refused and the old engine keeps serving);
2. builds and starts a new engine for it beside the old one, and checks after start that the engine read
   the verified bytes (`integrity_check`);
3. points the hub at the new engine: requests admitted from then on use it;
4. retires the old engine: it stops once no response holds it (`EngineHub.hold`, taken before admission
   and released when the response ends) and it runs nothing, or after `grace_seconds`.

A response's `system_fingerprint` and `X-Model-Digest` come from the engine that served it, so they name
the version that was active when the request was admitted. Both engines are resident during a swap: the
pool needs room for two copies of the model and their KV caches (on CPU pools, 2 × `kv_cache_gib`; on
GPUs, a `gpu_memory_utilization` that leaves the second engine its share).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from server.audit.service import Actor
from server.audit.sink import AuditSink
from server.engine.hub import EngineFactory, EngineHub
from server.engine.types import ModelInfo
from server.settings import ModelSettings

log = logging.getLogger(__name__)

ActiveDigests = Callable[[], dict[str, str | None]]  # model name -> active version's digest (blocking)
ResolveOne = Callable[[ModelSettings], ModelInfo]  # the verified active version (blocking)
_RETRY_FAILED_SECONDS = 60.0


class ModelSwapper:
    def __init__(
        self,
        hub: EngineHub,
        models: list[ModelSettings],
        active_digests: ActiveDigests,
        resolve_one: ResolveOne,
        factory: EngineFactory,
        audit: AuditSink,
        *,
        grace_seconds: float,
        poll_seconds: float = 1.0,
    ) -> None:
        self._hub = hub
        self._models = {m.name: m for m in models}
        self._active_digests = active_digests
        self._resolve_one = resolve_one
        self._factory = factory
        self._audit = audit
        self._grace = grace_seconds
        self._poll = poll_seconds
        self._wake = asyncio.Event()
        self._failed: dict[str, tuple[str | None, float]] = {}  # model -> (digest that failed, when)
        self._task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[bool]] = set()

    def poke(self) -> None:
        """Check now (this replica just promoted or rolled back)."""
        self._wake.set()

    async def check(self) -> None:
        """Swap every model whose active digest differs from the one served (one at a time)."""
        if not self._hub.ready():
            return  # start-up (or a failed start) owns the engines until they are up
        wanted = await asyncio.to_thread(self._active_digests)
        served = {info.name: info.digest for info in self._hub.models()}
        for name, digest in wanted.items():
            if digest is None:
                continue
            if served.get(name) == digest:  # e.g. rolled back to the served version after a failed swap
                self._failed.pop(name, None)
                self._hub.swap_errors.pop(name, None)
                continue
            failed_digest, when = self._failed.get(name, (None, 0.0))
            if failed_digest == digest and time.monotonic() - when < _RETRY_FAILED_SECONDS:
                continue
            await self.swap(name, digest)

    async def swap(self, name: str, digest: str | None = None) -> bool:
        """Replace `name`'s engine with one serving its active version. False (old engine kept) on failure."""
        model = self._models[name]
        new = None
        try:
            info = await asyncio.to_thread(self._resolve_one, model)
            new = await asyncio.to_thread(self._factory, info)
            await new.start()
            if info.integrity_check is not None:
                await asyncio.to_thread(info.integrity_check)
        except asyncio.CancelledError:  # shutdown mid-swap: the new engine is nobody's, stop it here
            if new is not None:
                await asyncio.shield(new.stop())
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            log.error("hot swap of %s failed; the previous version keeps serving: %s", name, reason)
            self._failed[name] = (digest, time.monotonic())
            self._hub.swap_errors[name] = reason
            fields = {"model": name, "digest": digest, "reason": reason[:500]}
            self._audit.submit(Actor.system(), "registry.swap", "failure", **fields)
            if new is not None:
                await new.stop()
            return False
        old = self._hub.replace(new)
        self._failed.pop(name, None)
        log.warning("%s now serves %s (was %s)", name, info.fingerprint, old.info.fingerprint if old else None)
        self._audit.submit(
            Actor.system(),
            "registry.swap",
            "success",
            model=name,
            version=info.version,
            digest=info.digest,
            previous=old.info.version if old else None,
        )
        if old is not None:
            task = asyncio.create_task(self._hub.retire(old, self._grace))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception as exc:
                log.warning("active-version poll failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll)
            self._wake.clear()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._retiring) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
