"""A small deterministic in-process engine for fast tests of the layers above the engine.

It is a real implementation of the `Engine` interface (streaming, n, stop strings, max_tokens, aborts,
queue accounting) over a byte-level tokenizer, with canned answers. It never replaces the end-to-end suite,
which runs the real vLLM engine.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Sequence
from typing import Any

from server.engine.counters import RequestCounter
from server.engine.types import (
    ChoiceDelta,
    EngineStats,
    GenerationRequest,
    GenerationUpdate,
    ModelInfo,
    TokenLogprob,
)
from server.errors import EngineUnavailable

_EOS = 0
_OFFSET = 1  # token id = byte value + 1; id 0 is end-of-sequence


class ByteTokenizer:
    """One token per UTF-8 byte; the chat "template" is `role: content` lines."""

    eos_token_id: int | None = _EOS

    @property
    def vocab_size(self) -> int:
        return 256 + _OFFSET  # every byte, plus end-of-sequence

    def encode(self, text: str) -> list[int]:
        return [b + _OFFSET for b in text.encode("utf-8")]

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t - _OFFSET for t in token_ids if t >= _OFFSET).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
        if tools:
            lines.insert(0, "tools: " + json.dumps([t["function"]["name"] for t in tools]))
        return self.encode("\n".join(lines) + "\nassistant:")


def fake_model_info(name: str, pool: str, max_model_len: int) -> ModelInfo:
    """A stand-in model identity for the fake engine (there are no weights to digest)."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(f"fake:{name}".encode()).hexdigest()
    return ModelInfo(
        name=name, version="fake", digest=digest, path=Path("."), max_model_len=max_model_len, pool=pool, created=0
    )


def canned_answer(prompt: str, json_mode: bool) -> str:
    if json_mode:
        return '{"answer": "Paris"}'
    if "capital of France" in prompt:
        return "The capital of France is Paris."
    return "Hello! I am a deterministic test engine and I repeat myself. " * 8


class FakeEngine:
    """Deterministic `Engine`; `token_delay` seconds between streamed tokens makes disconnects testable."""

    applies_watermark = False  # it ignores `_wm`: its responses say `X-Watermark: off`

    def __init__(self, info: ModelInfo, token_delay: float = 0.0) -> None:
        self.info = info
        self.tokenizer = ByteTokenizer()
        self.token_delay = token_delay
        self._counter = RequestCounter()
        self._ready = False
        self.aborted: list[str] = []

    async def start(self) -> None:
        self._ready = True

    async def stop(self) -> None:
        self._ready = False

    def ready(self) -> bool:
        return self._ready

    def stats(self) -> EngineStats:
        return self._counter.stats()

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationUpdate]:
        if not self._ready:
            raise EngineUnavailable("the model's engine is not running; retry shortly")
        opts = request.options
        prompt = self.tokenizer.decode(request.prompt_token_ids)
        structured = opts.structured is not None
        answers = [self._answer(prompt, structured, opts.stop, opts.max_tokens) for _ in range(opts.n)]
        prompt_tokens = len(request.prompt_token_ids)
        finished = False
        with self._counter.track() as tracked:
            try:
                if not opts.stream:
                    await asyncio.sleep(self.token_delay)
                    tracked.started()
                    finished = True
                    yield GenerationUpdate(
                        choices=tuple(
                            self._delta(i, ids, reason, opts.logprobs) for i, (ids, reason) in enumerate(answers)
                        ),
                        prompt_tokens=prompt_tokens,
                        finished=True,
                    )
                    return
                longest = max(len(ids) for ids, _ in answers)
                for step in range(longest):
                    await asyncio.sleep(self.token_delay)
                    tracked.started()
                    deltas = []
                    for i, (ids, reason) in enumerate(answers):
                        if step < len(ids):
                            last = step == len(ids) - 1
                            deltas.append(self._delta(i, ids[step : step + 1], reason if last else None, opts.logprobs))
                    finished = step == longest - 1
                    yield GenerationUpdate(choices=tuple(deltas), prompt_tokens=prompt_tokens, finished=finished)
            finally:
                if not finished:
                    self._counter.aborted += 1
                    await self.abort(request.request_id)

    def _answer(self, prompt: str, structured: bool, stop: Sequence[str], max_tokens: int) -> tuple[list[int], str]:
        text = canned_answer(prompt, structured)
        reason = "stop"
        for s in stop:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        ids = self.tokenizer.encode(text)
        if len(ids) > max_tokens:
            ids, reason = ids[:max_tokens], "length"
        return ids or [_EOS], reason

    def _delta(self, index: int, ids: list[int], reason: str | None, logprobs: int | None) -> ChoiceDelta:
        lps = None
        if logprobs is not None:
            lps = tuple(
                TokenLogprob(
                    token=self.tokenizer.decode([t]),
                    token_id=t,
                    logprob=-0.5,
                    top=tuple((self.tokenizer.decode([t]), t, -0.5) for _ in range(min(1, logprobs))),
                )
                for t in ids
            )
        return ChoiceDelta(
            index=index, text=self.tokenizer.decode(ids), token_ids=tuple(ids), logprobs=lps, finish_reason=reason
        )  # type: ignore[arg-type]

    async def prompt_top_logprobs(self, prompt_token_ids: Sequence[int], k: int) -> list[tuple[float, ...] | None]:
        """A fixed toy model: after an even token it is unsure (top two 0.15 and 0.1), after an odd one sure
        (0.9, 0.05); the rest of the mass is spread thinly. Enough to test code that gates on confidence."""
        if not self._ready:
            raise EngineUnavailable("the model's engine is not running; retry shortly")
        unsure, sure = (math.log(0.15), math.log(0.1)), (math.log(0.9), math.log(0.05))
        out: list[tuple[float, ...] | None] = [None]
        for prev in prompt_token_ids[:-1]:
            top = unsure if prev % 2 == 0 else sure
            out.append((*top, *[math.log(1e-4)] * max(0, k - 2))[:k])
        return out[: len(prompt_token_ids)]
