"""Driving engine requests: wait for the final output, or interleave several streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from server.engine.types import Engine, GenerationRequest, GenerationUpdate
from server.errors import ServerError


async def final_output(engine: Engine, gen: GenerationRequest) -> GenerationUpdate:
    final: GenerationUpdate | None = None
    async for update in engine.generate(gen):
        final = update
    if final is None:
        raise ServerError("the engine returned no output")
    return final


async def merged_outputs(engine: Engine, gens: list[GenerationRequest]) -> AsyncIterator[tuple[int, GenerationUpdate]]:
    """Interleave the updates of several engine requests; closing this closes (aborts) all of them."""
    if len(gens) == 1:
        async for update in engine.generate(gens[0]):
            yield 0, update
        return
    queue: asyncio.Queue[tuple[int, GenerationUpdate | BaseException | None]] = asyncio.Queue()

    async def pump(p: int, gen: GenerationRequest) -> None:
        try:
            async for update in engine.generate(gen):
                await queue.put((p, update))
            await queue.put((p, None))
        except Exception as exc:
            await queue.put((p, exc))

    tasks = [asyncio.ensure_future(pump(p, g)) for p, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            p, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield p, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
