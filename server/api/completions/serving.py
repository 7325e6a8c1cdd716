"""`POST /v1/completions`: one engine request per prompt, answered as JSON or one merged SSE stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from server.api.body import read_body
from server.api.completions.protocol import CompletionRequest
from server.api.generation import final_output, merged_outputs
from server.api.inference import InferenceService, Tally
from server.api.protocol import parse_request
from server.api.responses import ResponseMeta, completion_logprobs, finish_reason, usage
from server.api.sampling import build_options
from server.api.streaming import DONE, sse
from server.engine.types import Engine, GenerationRequest
from server.errors import InvalidRequest, ServerError

# OpenAI's default for the legacy completions endpoint.
DEFAULT_MAX_TOKENS = 16


class CompletionService(InferenceService):
    async def create(self, request: Request) -> Response:
        req = parse_request(CompletionRequest, await read_body(request, self.limits.max_body_bytes))
        engine = self.engine_for(request, req.model)
        prompts = self._prompts(engine, req)
        meta = ResponseMeta.new("cmpl", engine.info)
        gens = []
        for i, ids in enumerate(prompts):
            options = build_options(
                self.limits,
                max_model_len=engine.info.max_model_len,
                prompt_tokens=len(ids),
                max_tokens=req.max_tokens,
                default_max_tokens=DEFAULT_MAX_TOKENS,
                temperature=req.temperature,
                top_p=req.top_p,
                n=req.n,
                stop=req.stop,
                seed=req.seed,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                logprobs=req.logprobs,
                structured=None,
                stream=req.stream,
                prompt_param="prompt",
            )
            gens.append(GenerationRequest(request_id=f"{meta.id}-{i}", prompt_token_ids=ids, options=options))
        echoes = [engine.tokenizer.decode(ids) if req.echo else "" for ids in prompts]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self.answer(
                request,
                engine,
                meta,
                gens,
                stream=lambda tally, gens: self._stream(engine, gens, req, meta, echoes, include_usage, tally),
            )
        return await self.answer(
            request,
            engine,
            meta,
            gens,
            complete=lambda tally, gens: self._complete(engine, gens, req, meta, echoes, tally),
        )

    def _prompts(self, engine: Engine, req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            items = [prompt]
        else:
            items = list(prompt)
        if len(items) > self.limits.max_prompts:
            raise InvalidRequest(
                f"At most {self.limits.max_prompts} prompts per request are allowed; got {len(items)}.",
                param="prompt",
                code="too_many_prompts",
            )
        if len(items) * req.n > self.limits.max_n * self.limits.max_prompts:
            raise InvalidRequest("Too many choices requested (prompts × n).", param="n")
        out = []
        for item in items:
            if isinstance(item, str):
                if len(item) > self.limits.max_message_chars:
                    raise InvalidRequest(
                        f"A prompt is longer than {self.limits.max_message_chars} characters.", param="prompt"
                    )
                ids = engine.tokenizer.encode(item)
            else:
                ids = list(item)
            if not ids:
                raise InvalidRequest("A prompt is empty; send at least one token.", param="prompt")
            out.append(ids)
        return out

    async def _complete(
        self,
        engine: Engine,
        gens: list[GenerationRequest],
        req: CompletionRequest,
        meta: ResponseMeta,
        echoes: list[str],
        tally: Tally,
    ) -> dict[str, Any]:
        try:
            async with asyncio.TaskGroup() as group:  # one failure cancels (aborts) the other prompts
                tasks = [group.create_task(final_output(engine, g)) for g in gens]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        finals = [t.result() for t in tasks]
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, final in enumerate(finals):
            prompt_tokens += final.prompt_tokens
            for c in sorted(final.choices, key=lambda c: c.index):
                completion_tokens += len(c.token_ids)
                choices.append(
                    {
                        "index": p * req.n + c.index,
                        "text": echoes[p] + c.text,
                        "logprobs": completion_logprobs(c.logprobs, len(echoes[p])),
                        "finish_reason": finish_reason(c.finish_reason),
                    }
                )
        tally.prompt, tally.completion = prompt_tokens, completion_tokens
        self.metrics.observe_tokens(meta.info.name, prompt_tokens, completion_tokens)
        return {**meta.base("text_completion"), "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    async def _stream(
        self,
        engine: Engine,
        gens: list[GenerationRequest],
        req: CompletionRequest,
        meta: ResponseMeta,
        echoes: list[str],
        include_usage: bool,
        tally: Tally,
    ) -> AsyncIterator[bytes]:
        base = meta.base("text_completion")
        if include_usage:
            base["usage"] = None
        started, first = time.perf_counter(), True
        prompt_tokens: dict[int, int] = {}
        echoed: set[int] = set()
        try:
            async for p, update in merged_outputs(engine, gens):
                if first:
                    self.metrics.ttft.labels(meta.info.name).observe(time.perf_counter() - started)
                    first = False
                prompt_tokens[p] = update.prompt_tokens
                tally.prompt = sum(prompt_tokens.values())
                choices = []
                for c in update.choices:
                    index = p * req.n + c.index
                    tally.completion += len(c.token_ids)
                    prefix = "" if index in echoed else echoes[p]
                    echoed.add(index)
                    if c.text or prefix or c.finish_reason or c.logprobs:
                        choices.append(
                            {
                                "index": index,
                                "text": prefix + c.text,
                                "logprobs": completion_logprobs(c.logprobs, 0),
                                "finish_reason": finish_reason(c.finish_reason),
                            }
                        )
                if choices:
                    yield sse({**base, "choices": choices})
        except ServerError as exc:
            self.metrics.errors.labels(exc.error_type, exc.code or "").inc()
            yield sse(exc.body())
            yield DONE
            return
        finally:
            self.metrics.observe_tokens(meta.info.name, tally.prompt, tally.completion)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(tally.prompt, tally.completion)})
        yield DONE
