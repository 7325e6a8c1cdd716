"""What the completion endpoints share: the engine lookup behind the caller's model allowlist, and the
admission bracket around generation (reserve before the engine sees anything, settle exactly once after)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from server.api.responses import ResponseMeta
from server.api.streaming import ClientGone, EventStreamResponse, cancel_on_disconnect
from server.engine.hub import EngineHub
from server.engine.types import Engine, GenerationRequest
from server.errors import PermissionDenied
from server.identity.authn import client_addr, principal_of
from server.observability.metrics import Metrics
from server.policy.gatekeeper import Gatekeeper
from server.settings import LimitSettings
from server.watermark.marking import RequestMarker

Gens = list[GenerationRequest]


@dataclass
class Tally:
    """Tokens a response actually used, updated as generation proceeds (what admission settles to)."""

    prompt: int = 0
    completion: int = 0

    @property
    def used(self) -> int:
        return self.prompt + self.completion


class InferenceService:
    def __init__(
        self, hub: EngineHub, limits: LimitSettings, metrics: Metrics, gatekeeper: Gatekeeper, marker: RequestMarker
    ) -> None:
        self.hub = hub
        self.limits = limits
        self.metrics = metrics
        self.gatekeeper = gatekeeper
        self.marker = marker

    def engine_for(self, request: Request, model: str) -> Engine:
        """The model's engine, if the caller's credential may use that model (403 before 404: an allowlisted
        key learns nothing about models outside its list)."""
        if not principal_of(request).may_use_model(model):
            raise PermissionDenied(
                f"This API key may not use the model {model!r}.", param="model", code="model_not_allowed"
            )
        return self.hub.get(model)

    async def answer(
        self,
        request: Request,
        engine: Engine,
        meta: ResponseMeta,
        gens: Gens,
        *,
        stream: Callable[[Tally, Gens], AsyncIterator[bytes]] | None = None,
        complete: Callable[[Tally, Gens], Awaitable[dict[str, Any]]] | None = None,
    ) -> Response:
        """Admit (reserving prompt + n × max_tokens of every engine request), watermark, generate, and
        settle to what was used. `stream`/`complete` receive the engine requests with the watermark set.

        Streaming: settled when the response closes, to the tokens streamed so far (a disconnect settles
        what was generated). Non-streaming: to the usage on success, to nothing if generation failed, and
        to the whole reservation if the client left mid-generation (the engine's work is unknown).
        """
        principal = principal_of(request)
        # The engine outlives a hot swap (`EngineHub.retire`) until this response lets go of it.
        hold = self.hub.hold(engine)
        try:
            admission = await self.gatekeeper.admit(
                principal,
                pool=engine.info.pool,
                request_id=meta.id,
                tokens=sum(len(g.prompt_token_ids) + g.options.n * g.options.max_tokens for g in gens),
                client_addr=client_addr(request),
            )
        except BaseException:
            hold.release()
            raise
        try:
            gens, mark = await self.marker.mark(principal, engine, gens)
        except BaseException:
            hold.release()
            await admission.finish(0)  # nothing was generated: refund the whole reservation
            raise
        headers = {**meta.headers(), **admission.headers, **mark}
        tally = Tally()
        if stream is not None:

            async def close() -> None:
                hold.release()
                await admission.finish(tally.used)

            return EventStreamResponse(stream(tally, gens), headers=headers, on_close=close)
        assert complete is not None
        try:
            body = await cancel_on_disconnect(request, complete(tally, gens))
        except ClientGone:
            await admission.finish(None)
            raise
        except BaseException:
            await admission.finish(tally.used)
            raise
        finally:
            hold.release()
        await admission.finish(tally.used)
        return JSONResponse(body, headers=headers)
