"""Pieces shared by the completion endpoints' responses: headers, usage and logprobs in OpenAI's shapes."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from server.engine.types import ModelInfo, TokenLogprob


@dataclass(frozen=True)
class ResponseMeta:
    """Identity of one response: its id, creation time and the exact model version that produced it."""

    id: str
    created: int
    info: ModelInfo

    @classmethod
    def new(cls, prefix: str, info: ModelInfo) -> ResponseMeta:
        return cls(id=f"{prefix}-{secrets.token_hex(16)}", created=int(time.time()), info=info)

    def headers(self) -> dict[str, str]:
        return {
            "X-Request-Id": self.id,
            "X-Model-Version": self.info.version,
            "X-Model-Digest": f"sha256:{self.info.digest}",
        }

    def base(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.info.name,
            "system_fingerprint": self.info.fingerprint,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(items: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    if items is None:
        return None
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": _bytes(t.token),
                "top_logprobs": [{"token": tok, "logprob": lp, "bytes": _bytes(tok)} for tok, _, lp in t.top],
            }
            for t in items
        ],
        "refusal": None,
    }


def completion_logprobs(items: tuple[TokenLogprob, ...] | None, start_offset: int) -> dict[str, Any] | None:
    if items is None:
        return None
    offsets, offset = [], start_offset
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [{tok: lp for tok, _, lp in t.top} for t in items],
        "text_offset": offsets,
    }


def finish_reason(reason: str | None) -> str | None:
    """vLLM's "abort" only reaches a client that is still connected when the server stops."""
    return "stop" if reason == "abort" else reason
