"""Watermarking one admitted request: pick its key, seal it into each engine request, name it in a header.

The completion endpoints call `RequestMarker.mark` after admission and before the engine sees anything.
It is the only place `_wm` is written (`request.watermark_extra_args`); what a client sent never reaches
`extra_args` (the protocol refuses the field). The `X-Watermark` header says which scheme and key id this
response carries (`gumbel` for a sampled request, `kgw-gated` for a greedy one under the default `auto`
key), or `off; reason=exempt|disabled|engine` when the API key is exempt, watermarking is disabled, or
the engine does not apply watermarks (the fake test engine): the header never claims a mark that is not
there, and no response goes unmarked without saying why.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import cast

from server.engine.types import Engine, GenerationRequest
from server.identity.principal import Principal
from server.watermark.keys import WatermarkKeyring
from server.watermark.request import (
    HEADER,
    OFF_DISABLED,
    OFF_ENGINE,
    OFF_EXEMPT,
    header_value,
    watermark_extra_args,
)
from server.watermark.types import KeyMaterial


class RequestMarker:
    def __init__(self, keys: WatermarkKeyring) -> None:
        self.keys = keys

    async def mark(
        self, principal: Principal, engine: Engine, gens: list[GenerationRequest]
    ) -> tuple[list[GenerationRequest], dict[str, str]]:
        """`gens` with the request's watermark set, and the response header that names it."""
        if not engine.applies_watermark:
            return gens, {HEADER: header_value(None, off=OFF_ENGINE)}
        if not self.keys.settings.enabled:
            return gens, {HEADER: header_value(None, off=OFF_DISABLED)}
        material = self.keys.cached_for_request(principal.org_id, principal.api_key_id)
        if material is self.keys.STALE:  # the cache is due for a re-read: the database call goes to a thread
            material = await asyncio.to_thread(self.keys.for_request, principal.org_id, principal.api_key_id)
        if material is None:  # the API key is exempt (watermarking is on: checked above)
            return gens, {HEADER: header_value(None, off=OFF_EXEMPT)}
        material = cast(KeyMaterial, material)  # neither None nor STALE from here on
        marked = [
            replace(
                g,
                options=replace(
                    g.options,
                    extra_args={**g.options.extra_args, **watermark_extra_args(material, g.options.temperature)},
                ),
            )
            for g in gens
        ]
        return marked, {HEADER: header_value(material, gens[0].options.temperature if gens else None)}
