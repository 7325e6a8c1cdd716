"""Shared pieces of the OpenAI protocol: the strict base model and body parsing into clear 400s.

Requests are parsed with pydantic in strict mode from the raw JSON bytes: wrong types are not coerced,
unknown fields are refused, and fields that would steer the engine are refused by name (vLLM's own server
forwards several of them).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import InvalidRequest, UnknownField

# Fields other servers accept that would let a client steer the engine, the template or the watermark.
ENGINE_CONTROL_FIELDS = frozenset(
    {
        "vllm_xargs",
        "extra_args",
        "chat_template",
        "chat_template_kwargs",
        "logits_processors",
        "cache_salt",
        "watermarking",
        "watermark",
        "priority",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "guided_decoding_backend",
        "structured_outputs",
        "allowed_token_ids",
        "bad_words",
        "min_tokens",
        "ignore_eos",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "documents",
        "mm_processor_kwargs",
        "kv_transfer_params",
        "prompt_logprobs",
        "return_tokens_as_token_ids",
        "request_id",
        "truncate_prompt_tokens",
        "repetition_penalty",
        "top_k",
        "min_p",
        "use_beam_search",
        "length_penalty",
        "stop_token_ids",
        "include_stop_str_in_output",
        "lora_request",
    }
)


class StrictModel(BaseModel):
    """Base for every request model: no unknown fields, no type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


ModelName = Annotated[str, Field(min_length=1, max_length=256)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
User = Annotated[str, Field(max_length=256)]

M = TypeVar("M", bound=BaseModel)


def parse_request(model: type[M], raw: bytes) -> M:
    """Validate raw JSON bytes into `model`, turning every failure into a 400 that names the field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _to_invalid_request(exc) from None


def _to_invalid_request(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_url=False)
    first = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    loc = [str(p) for p in first.get("loc", ())]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return InvalidRequest(
            "The request body is not valid JSON (or not valid UTF-8): "
            f"{first.get('msg', '')}. Send a JSON object encoded as UTF-8.",
            code="invalid_json",
        )
    if kind == "model_type" and not loc:
        return InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        name = loc[-1] if loc else "?"
        if name in ENGINE_CONTROL_FIELDS or name.startswith("watermark"):
            return UnknownField(
                f"The field {param!r} controls the engine and is not accepted by this server. "
                "Remove it from the request.",
                param=param,
            )
        return UnknownField(
            f"Unrecognized request argument supplied: {param!r}. Remove it; this server accepts only the "
            "documented OpenAI fields.",
            param=param,
        )
    if kind == "value_error":
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return InvalidRequest(f"Invalid request: {message}.", param=param, code="invalid_value")
    if kind == "missing":
        return InvalidRequest(f"Missing required field {param!r}.", param=param, code="missing_field")
    got = first.get("input")
    shown = repr(got)[:80] if not isinstance(got, dict | list) else type(got).__name__
    return InvalidRequest(
        f"Invalid value for {param!r}: {first.get('msg', 'invalid')} (got {shown}).", param=param, code="invalid_value"
    )


def as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def dump(value: Any) -> Any:
    """Plain JSON-ready data from a pydantic model or a container of them."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, list):
        return [dump(v) for v in value]
    return value
