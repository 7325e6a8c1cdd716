"""`POST /v1/watermark/detect`: was this text generated here, under a key the caller may test against?

The endpoint is an oracle: someone who wants to launder a text can edit it until the answer flips. So it
is rate-limited per credential, answers with aggregates only (never which tokens scored), and tries
only the caller organization's keys and the deployment default's (see `keys.WatermarkKeyring`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from server.api.body import read_body
from server.api.protocol import ModelName, StrictModel, parse_request
from server.errors import InvalidRequest, PermissionDenied, TooManyAttempts
from server.identity.authn import client_addr, principal_of
from server.identity.authz import requires

router = APIRouter()

MAX_TEXT_CHARS = 200_000
MAX_TOKEN_IDS = 65_536
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class DetectRequest(StrictModel):
    """Exactly one of `text` (re-tokenized with the model's tokenizer) or `token_ids`."""

    model: ModelName
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKEN_IDS)] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> DetectRequest:
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("send exactly one of 'text' or 'token_ids'")
        return self


class DetectLimiter:
    """Sliding one-minute window per credential, in this process (each replica counts its own)."""

    def __init__(self, per_minute: int, clock: Any = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}

    def check(self, who: str) -> None:
        now = self._clock()
        hits = self._hits.setdefault(who, deque())
        while hits and now - hits[0] >= 60.0:
            hits.popleft()
        if len(hits) >= self.per_minute:
            retry = max(1, math.ceil(60.0 - (now - hits[0])))
            raise TooManyAttempts(
                f"Watermark detection is limited to {self.per_minute} requests per minute per credential; "
                f"retry in {retry} s.",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )
        hits.append(now)
        if len(self._hits) > 10_000:  # drop idle credentials so the table stays small
            for key in [k for k, v in self._hits.items() if not v or now - v[-1] >= 60.0]:
                del self._hits[key]


def _limiter(request: Request) -> DetectLimiter:
    state = request.app.state
    limiter = getattr(state, "watermark_detect_limiter", None)
    if limiter is None:
        limiter = DetectLimiter(state.watermark_keys.settings.detect_requests_per_minute)
        state.watermark_detect_limiter = limiter
    return limiter


@router.post("/v1/watermark/detect", dependencies=[requires("watermark:detect")])
async def detect_watermark(request: Request) -> dict[str, Any]:
    principal = principal_of(request)
    state = request.app.state
    _limiter(request).check(f"{principal.org_id}/{principal.api_key_id or principal.user_id}")
    body = parse_request(DetectRequest, await read_body(request, state.settings.limits.max_body_bytes))
    if not principal.may_use_model(body.model):
        raise PermissionDenied(f"This credential may not use the model {body.model!r}.", code="model_not_allowed")
    engine = state.hub.get(body.model)
    keys = state.watermark_keys
    settings = keys.settings
    if body.text is not None:
        token_ids = await asyncio.to_thread(engine.tokenizer.encode, body.text)
    else:
        token_ids = list(body.token_ids or ())
    if len(token_ids) > settings.detect_max_tokens:
        raise InvalidRequest(
            f"The text is {len(token_ids)} tokens long; detection accepts at most {settings.detect_max_tokens}. "
            "Send a shorter excerpt.",
            param="text" if body.text is not None else "token_ids",
            code="too_many_tokens",
        )
    candidates = await asyncio.to_thread(keys.all_keys_for, principal.org_id)
    result = await asyncio.to_thread(
        _run_detector, token_ids, candidates, getattr(engine.tokenizer, "vocab_size", None), settings
    )
    state.audit_sink.submit(
        principal.actor(client_addr(request)),
        "watermark.detect",
        "success",
        model=body.model,
        detected=result["detected"],
        key_id=result["key_id"],
        tokens_scored=result["tokens_scored"],
    )
    return result


def _run_detector(token_ids: list[int], candidates: list[Any], vocab_size: int | None, settings: Any) -> dict:
    from server.watermark.detector import detect  # torch and scipy load on first use, not at server start

    try:
        result = detect(
            token_ids,
            candidates,
            vocab_size,
            threshold=settings.detect_p_threshold,
            min_tokens=settings.detect_min_tokens,
        )
    except ValueError as exc:
        raise InvalidRequest(f"Invalid request: {exc}.", param="token_ids", code="invalid_value") from None
    return result.as_dict()
