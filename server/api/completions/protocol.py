"""`POST /v1/completions` request model (strict; see server.api.protocol)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from server.api.protocol import (
    ModelName,
    Penalty,
    PositiveInt,
    Seed,
    StreamOptions,
    StrictModel,
    Temperature,
    TopP,
    User,
)

TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Prompt = (
    str
    | list[str]
    | Annotated[list[TokenId], Field(min_length=1)]
    | list[Annotated[list[TokenId], Field(min_length=1)]]
)


class CompletionRequest(StrictModel):
    model: ModelName
    prompt: Prompt
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: PositiveInt = 1
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    user: User | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        return self
