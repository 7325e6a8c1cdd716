"""Turn validated request fields into engine `SamplingOptions`, enforcing the configured caps.

Every cap answers a 400 that names the field and the limit. The token budget is exact: the prompt is
counted with the model's tokenizer and `max_tokens` may not push it past the context length, so admission
control can reserve `prompt_tokens + max_tokens` and never be overshot.
"""

from __future__ import annotations

from server.api.protocol import as_list
from server.engine.types import SamplingOptions, StructuredOutput
from server.errors import ContextLengthExceeded, InvalidRequest
from server.settings import LimitSettings


def check_prompt_length(prompt_tokens: int, max_model_len: int, param: str) -> None:
    if prompt_tokens >= max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens, and the prompt has "
            f"{prompt_tokens} tokens. Shorten the {param}.",
            param=param,
        )


def build_options(
    limits: LimitSettings,
    *,
    max_model_len: int,
    prompt_tokens: int,
    max_tokens: int | None,
    default_max_tokens: int | None = None,
    temperature: float | None,
    top_p: float | None,
    n: int,
    stop: str | list[str] | None,
    seed: int | None,
    presence_penalty: float,
    frequency_penalty: float,
    logprobs: int | None,
    structured: StructuredOutput | None,
    stream: bool,
    prompt_param: str,
) -> SamplingOptions:
    if n > limits.max_n:
        raise InvalidRequest(
            f"n is {n}, above this server's limit of {limits.max_n}. Lower n.", param="n", code="n_too_large"
        )
    stops = as_list(stop)
    if len(stops) > limits.max_stop_sequences:
        raise InvalidRequest(
            f"At most {limits.max_stop_sequences} stop sequences are allowed; got {len(stops)}.",
            param="stop",
            code="too_many_stop_sequences",
        )
    for s in stops:
        if not s or len(s) > limits.max_stop_chars:
            raise InvalidRequest(
                f"Each stop sequence must have 1 to {limits.max_stop_chars} characters.",
                param="stop",
                code="invalid_value",
            )
    if logprobs is not None and logprobs > limits.max_top_logprobs:
        raise InvalidRequest(
            f"At most {limits.max_top_logprobs} log probabilities per token are allowed; got {logprobs}.",
            param="top_logprobs" if prompt_param == "messages" else "logprobs",
            code="invalid_value",
        )
    check_prompt_length(prompt_tokens, max_model_len, prompt_param)
    room = max_model_len - prompt_tokens
    if max_tokens is None:
        max_tokens = min(default_max_tokens or limits.default_max_tokens, room)
    else:
        if max_tokens > limits.max_tokens:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}, above this server's limit of {limits.max_tokens}. Lower max_tokens.",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        if max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {max_model_len} tokens. The prompt has "
                f"{prompt_tokens} tokens and max_tokens asks for {max_tokens}: at most {room} are left. "
                "Lower max_tokens or shorten the prompt.",
                param="max_tokens",
            )
    return SamplingOptions(
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        n=n,
        stop=tuple(stops),
        seed=seed,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logprobs=logprobs,
        structured=structured,
        stream=stream,
    )
