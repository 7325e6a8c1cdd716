"""The engine vocabulary: what the HTTP layer hands an engine and what comes back.

These types are ours, not vLLM's, so the layers above the engine (protocol, admission, audit) never import
vLLM and can be tested against the deterministic in-process engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class ModelInfo:
    """What every response names: the served model id, its version and content digest."""

    name: str
    version: str
    digest: str
    path: Path
    max_model_len: int
    pool: str
    created: int
    # Re-checks, after the engine has read the weights, that the verified folder did not change meanwhile
    # (closes the check-then-load window); raises with the reason. None for engines without files.
    integrity_check: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    @property
    def short_digest(self) -> str:
        return self.digest[:12]

    @property
    def fingerprint(self) -> str:
        return f"{self.name}@{self.version}+{self.short_digest}"


@dataclass(frozen=True)
class StructuredOutput:
    """Constrained decoding request: exactly one of json_schema / json_object is set."""

    json_schema: dict[str, Any] | None = None
    json_object: bool = False


@dataclass(frozen=True)
class SamplingOptions:
    """Validated sampling parameters. `extra_args` is set only by the server (never from a client)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    structured: StructuredOutput | None = None
    stream: bool = False
    extra_args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: Sequence[int]
    options: SamplingOptions


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, int, float], ...] = ()


@dataclass(frozen=True)
class ChoiceDelta:
    """New output of one choice since the last update (streaming) or all of it (final)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class GenerationUpdate:
    choices: tuple[ChoiceDelta, ...]
    prompt_tokens: int
    finished: bool


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    aborted: int = 0


class Tokenizer(Protocol):
    """The subset of a HF tokenizer the protocol layer needs."""

    eos_token_id: int | None

    @property
    def vocab_size(self) -> int:
        """Token ids are 0 <= id < vocab_size: every id the tokenizer or the model's output layer can produce."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]: ...


class Engine(Protocol):
    """One running model on one pool. Implementations: `VllmEngine` (real) and `FakeEngine` (tests)."""

    info: ModelInfo
    tokenizer: Tokenizer
    # Whether the engine applies the `_wm` watermark the server sets (`X-Watermark` says `off` otherwise).
    applies_watermark: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def ready(self) -> bool: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationUpdate]:
        """Yield updates until `finished`. Closing the iterator early aborts the request in the engine."""
        ...

    async def prompt_top_logprobs(self, prompt_token_ids: Sequence[int], k: int) -> list[tuple[float, ...] | None]:
        """Score a text with the model, generating nothing: entry t holds the k highest log-probabilities
        (highest first) of the model's prediction for position t from the tokens before it, None for t = 0.
        The raw model distribution (no penalties, processors or watermark). The watermark detector's gate."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...
