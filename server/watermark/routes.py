"""`POST /v1/watermark/detect`: was this text generated here, under a key the caller may test against?

The endpoint is an oracle: someone who wants to forge or launder a text can query it until the answer
flips. So, in this order:

  1. budget: one call charged to the caller's user and organization, per minute and per UTC day, in the
     shared limit store (`detect_guard.DetectGuard.admit`; never per API key);
  2. input: `text`, re-tokenized with the model's tokenizer; `token_ids` only for callers holding
     `watermark:admin` with a fresh second factor (arbitrary ids are the sharpest probing tool), checked
     against the model's real vocabulary;
  3. probe screen: near-identical queries are counted and, past a threshold, refused and reported
     (`DetectGuard.screen`, `probes`);
  4. the detector, trying only the caller organization's keys and the deployment default's; for keys
     with kgw-gated (greedy answers) the engine first scores the text once (`confidence`), generating
     nothing, so the detector knows where the model was unsure;
  5. the answer: a verdict with a coarse strength band, never counts or scores (`verdict`).

Each call is audited (`watermark.detect`) with the same coarse fields the caller sees: audit readers of
the organization must not get the exact scores the response withholds.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import Field, model_validator

from server.api.body import read_body
from server.api.protocol import ModelName, StrictModel, parse_request
from server.errors import InvalidRequest, PermissionDenied, StepUpRequired, TooManyAttempts
from server.identity.authn import client_addr, principal_of
from server.identity.authz import requires
from server.identity.principal import Principal
from server.watermark.confidence import text_confidences
from server.watermark.detect_guard import DetectGuard
from server.watermark.settings import WatermarkSettings
from server.watermark.types import KeyMaterial
from server.watermark.verdict import public_verdict

router = APIRouter()

MAX_TEXT_CHARS = 200_000
MAX_TOKEN_IDS = 65_536
TOKEN_IDS_PERMISSION = "watermark:admin"  # noqa: S105 - a permission name, not a secret
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class DetectRequest(StrictModel):
    """Exactly one of `text` (re-tokenized with the model's tokenizer) or `token_ids` (privileged)."""

    model: ModelName
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | None = None
    token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TOKEN_IDS)] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> DetectRequest:
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("send exactly one of 'text' or 'token_ids'")
        return self


def detect_guard(app: FastAPI) -> DetectGuard:
    """The app's guard, built on first use over the app's limit store (the admission store, shared by
    replicas when it is Redis; closed by its owner at shutdown)."""
    state = app.state
    guard = getattr(state, "watermark_detect_guard", None)
    if guard is None:
        store = state.gatekeeper.admitter.store
        guard = DetectGuard(store, state.watermark_keys.settings, state.audit_sink)
        state.watermark_detect_guard = guard
    return guard


@router.post("/v1/watermark/detect", dependencies=[requires("watermark:detect")])
async def detect_watermark(request: Request) -> dict[str, Any]:
    principal = principal_of(request)
    guard = detect_guard(request.app)
    try:
        reservation = await guard.admit(principal)
    except TooManyAttempts as exc:  # over budget or suspended: recorded like every admission refusal
        actor = principal.actor(client_addr(request))
        request.app.state.audit_sink.submit(actor, "watermark.detect", "denied", code=exc.code)
        raise
    try:
        return await _detect(request, principal, guard, reservation)
    finally:
        await guard.release(reservation)


async def _detect(request: Request, principal: Principal, guard: DetectGuard, request_id: str) -> dict[str, Any]:
    state = request.app.state
    settings: WatermarkSettings = state.watermark_keys.settings
    actor = principal.actor(client_addr(request), request_id)
    body = parse_request(DetectRequest, await read_body(request, state.settings.limits.max_body_bytes))
    if not principal.may_use_model(body.model):
        raise PermissionDenied(f"This credential may not use the model {body.model!r}.", code="model_not_allowed")
    engine = state.hub.get(body.model)
    vocab_size = int(engine.tokenizer.vocab_size)
    if body.token_ids is not None:
        _check_token_ids_allowed(principal, state.settings.auth.step_up_max_age_seconds)
        token_ids = list(body.token_ids)
        _check_vocabulary(token_ids, vocab_size)
    else:
        token_ids = await asyncio.to_thread(engine.tokenizer.encode, body.text or "")
    if len(token_ids) > settings.detect_max_tokens:
        raise InvalidRequest(
            f"The text is {len(token_ids)} tokens long; detection accepts at most {settings.detect_max_tokens}. "
            "Send a shorter excerpt.",
            param="text" if body.text is not None else "token_ids",
            code="too_many_tokens",
        )
    await guard.screen(principal, token_ids, actor, model=body.model)
    candidates = await asyncio.to_thread(state.watermark_keys.all_keys_for, principal.org_id)
    confidences = None
    if any(m.gate for m in candidates):  # kgw-gated scores only the positions where the model was unsure
        confidences = await text_confidences(engine, token_ids, engine.info.max_model_len)
    verdict = await asyncio.to_thread(_run_detector, token_ids, candidates, vocab_size, settings, confidences)
    state.audit_sink.submit(actor, "watermark.detect", "success", model=body.model, **verdict)
    return verdict


def _check_token_ids_allowed(principal: Principal, step_up_max_age: int) -> None:
    """`token_ids` let a caller probe any id in any context; only key administrators may send them."""
    if not principal.can(TOKEN_IDS_PERMISSION):
        raise PermissionDenied(
            f"Sending 'token_ids' needs the {TOKEN_IDS_PERMISSION!r} permission; send the text as 'text' instead.",
            param="token_ids",
        )
    if not principal.mfa_fresh(step_up_max_age, time.time()):
        raise StepUpRequired(
            f"Sending 'token_ids' needs {TOKEN_IDS_PERMISSION!r} with a recent second factor: get a token from "
            "/v1/auth/token with your password and TOTP code, then retry with it."
        )


def _check_vocabulary(token_ids: list[int], vocab_size: int) -> None:
    for index, token in enumerate(token_ids):
        if token >= vocab_size:
            raise InvalidRequest(
                f"token_ids[{index}] = {token} is outside the model's vocabulary (ids 0 to {vocab_size - 1}).",
                param="token_ids",
                code="invalid_value",
            )


def _run_detector(
    token_ids: list[int],
    candidates: list[KeyMaterial],
    vocab_size: int,
    settings: WatermarkSettings,
    confidences: list[tuple[float, ...] | None] | None = None,
) -> dict[str, Any]:
    """The one place the detector is called; returns the caller's verdict (never the raw result)."""
    from server.watermark.detector import detect  # torch and scipy load on first use, not at server start

    try:
        result = detect(
            token_ids,
            candidates,
            vocab_size,
            threshold=settings.detect_p_threshold,
            min_tokens=settings.detect_min_tokens,
            confidences=confidences,
        )
    except ValueError as exc:
        raise InvalidRequest(f"Invalid request: {exc}.", param="token_ids", code="invalid_value") from None
    return public_verdict(
        result, token_ids, candidates, threshold=settings.detect_p_threshold, min_tokens=settings.detect_min_tokens
    )
