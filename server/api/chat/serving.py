"""`POST /v1/chat/completions`: validate, render the chat template, generate, answer (JSON or SSE)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from server.api.body import read_body
from server.api.chat import tools as tooling
from server.api.chat.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    Content,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    ToolMessage,
)
from server.api.generation import final_output
from server.api.inference import InferenceService, Tally
from server.api.protocol import dump, parse_request
from server.api.responses import ResponseMeta, chat_logprobs, finish_reason, usage
from server.api.sampling import build_options
from server.api.streaming import DONE, sse
from server.engine.types import Engine, GenerationRequest, StructuredOutput
from server.errors import InvalidRequest, ServerError


class ChatService(InferenceService):
    async def create(self, request: Request) -> Response:
        req = parse_request(ChatCompletionRequest, await read_body(request, self.limits.max_body_bytes))
        engine = self.engine_for(request, req.model)
        self._check_messages(req)
        tooling.validate_tools(req, self.limits.max_tools)
        tools_on = bool(req.tools) and req.tool_choice != "none"
        forced = tooling.forced_schema(req) if tools_on else None
        structured = self._structured(req, forced)
        tool_dicts = [dump(t) for t in req.tools] if tools_on and req.tools else None
        prompt_ids = engine.tokenizer.render_chat(_template_messages(req), tool_dicts)
        # Tool calls are parsed from the whole answer, so such answers are generated first, then streamed.
        buffered = tools_on
        options = build_options(
            self.limits,
            max_model_len=engine.info.max_model_len,
            prompt_tokens=len(prompt_ids),
            max_tokens=req.requested_max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            n=req.n,
            stop=req.stop,
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            structured=structured,
            stream=req.stream and not buffered,
            prompt_param="messages",
        )
        meta = ResponseMeta.new("chatcmpl", engine.info)
        gens = [GenerationRequest(request_id=meta.id, prompt_token_ids=prompt_ids, options=options)]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self.answer(
                request,
                engine,
                meta,
                gens,
                stream=lambda tally, gens: self._stream(engine, gens[0], req, meta, include_usage, buffered, tally),
            )
        return await self.answer(
            request, engine, meta, gens, complete=lambda tally, gens: self._complete(engine, gens[0], req, meta, tally)
        )

    def _check_messages(self, req: ChatCompletionRequest) -> None:
        if len(req.messages) > self.limits.max_messages:
            raise InvalidRequest(
                f"At most {self.limits.max_messages} messages are allowed; got {len(req.messages)}.",
                param="messages",
                code="too_many_messages",
            )
        for i, message in enumerate(req.messages):
            if len(_text(message.content) or "") > self.limits.max_message_chars:
                raise InvalidRequest(
                    f"messages[{i}] is longer than {self.limits.max_message_chars} characters.",
                    param=f"messages[{i}].content",
                )

    @staticmethod
    def _structured(req: ChatCompletionRequest, forced: dict[str, Any] | None) -> StructuredOutput | None:
        fmt = req.response_format
        if forced is not None:
            if isinstance(fmt, ResponseFormatJsonObject | ResponseFormatJsonSchema):
                raise InvalidRequest(
                    "response_format cannot be combined with a forced tool_choice.", param="response_format"
                )
            return StructuredOutput(json_schema=forced)
        if isinstance(fmt, ResponseFormatJsonSchema):
            schema = fmt.json_schema.schema_ or {"type": "object"}
            tooling.check_json_schema(schema, "response_format.json_schema.schema")
            return StructuredOutput(json_schema=schema)
        if isinstance(fmt, ResponseFormatJsonObject):
            return StructuredOutput(json_object=True)
        return None

    async def _complete(
        self, engine: Engine, gen: GenerationRequest, req: ChatCompletionRequest, meta: ResponseMeta, tally: Tally
    ) -> dict[str, Any]:
        final = await final_output(engine, gen)
        choices = [
            self._choice(req, c.index, c.text, c.finish_reason, chat_logprobs(c.logprobs))
            for c in sorted(final.choices, key=lambda c: c.index)
        ]
        completion = sum(len(c.token_ids) for c in final.choices)
        tally.prompt, tally.completion = final.prompt_tokens, completion
        self.metrics.observe_tokens(meta.info.name, final.prompt_tokens, completion)
        return {**meta.base("chat.completion"), "choices": choices, "usage": usage(final.prompt_tokens, completion)}

    def _choice(
        self, req: ChatCompletionRequest, index: int, text: str, reason: str | None, logprobs: dict[str, Any] | None
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        calls = _tool_calls(req, text)
        if calls is not None:
            message["content"], parsed = calls
            if parsed:
                message["tool_calls"] = [c.as_openai() for c in parsed]
                reason = "tool_calls"
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason(reason)}

    async def _stream(
        self,
        engine: Engine,
        gen: GenerationRequest,
        req: ChatCompletionRequest,
        meta: ResponseMeta,
        include_usage: bool,
        buffered: bool,
        tally: Tally,
    ) -> AsyncIterator[bytes]:
        base = meta.base("chat.completion.chunk")
        if include_usage:
            base["usage"] = None
        name = meta.info.name
        started = time.perf_counter()
        yield sse(
            {
                **base,
                "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(req.n)
                ],
            }
        )
        first = True
        try:
            if buffered:
                final = await final_output(engine, gen)
                tally.prompt = final.prompt_tokens
                tally.completion = sum(len(c.token_ids) for c in final.choices)
                for c in sorted(final.choices, key=lambda c: c.index):
                    choice = self._choice(req, c.index, c.text, c.finish_reason, chat_logprobs(c.logprobs))
                    delta = {k: v for k, v in choice["message"].items() if k in ("content", "tool_calls")}
                    for i, call in enumerate(delta.get("tool_calls", [])):
                        call["index"] = i
                    yield sse(
                        {
                            **base,
                            "choices": [
                                {
                                    "index": c.index,
                                    "delta": delta,
                                    "logprobs": choice["logprobs"],
                                    "finish_reason": choice["finish_reason"],
                                }
                            ],
                        }
                    )
            else:
                async for update in engine.generate(gen):
                    if first:
                        self.metrics.ttft.labels(name).observe(time.perf_counter() - started)
                        first = False
                    tally.prompt = update.prompt_tokens
                    choices = []
                    for c in update.choices:
                        tally.completion += len(c.token_ids)
                        if c.text or c.finish_reason or c.logprobs:
                            choices.append(
                                {
                                    "index": c.index,
                                    "delta": {"content": c.text} if c.text else {},
                                    "logprobs": chat_logprobs(c.logprobs),
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
            self.metrics.observe_tokens(name, tally.prompt, tally.completion)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(tally.prompt, tally.completion)})
        yield DONE


def _tool_calls(req: ChatCompletionRequest, text: str) -> tuple[str | None, list[tooling.ParsedCall]] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    if tooling.forced_schema(req) is not None:
        calls = tooling.parse_forced(req, text)
        return (None if calls else text), calls
    return tooling.parse_auto(text, {t.function.name for t in req.tools})


def _text(content: Content | None) -> str | None:
    if content is None or isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def _template_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: plain text content, tool-call arguments as objects."""
    out: list[dict[str, Any]] = []
    for m in req.messages:
        role = "system" if m.role == "developer" else m.role
        item: dict[str, Any] = {"role": role, "content": _text(m.content) or ""}
        if isinstance(m, AssistantMessage) and m.tool_calls:
            calls = []
            for c in m.tool_calls:
                try:
                    args: Any = json.loads(c.function.arguments)
                except json.JSONDecodeError:
                    args = c.function.arguments
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
            item["tool_calls"] = calls
        if isinstance(m, ToolMessage):
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    return out
