"""The model's tokenizer and chat template, loaded from the local model folder only.

transformers renders chat templates in its immutable Jinja sandbox; a template that raises (or tries to
reach Python internals) becomes a 400 for the request, never a 500.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.errors import InvalidRequest


class HfTokenizer:
    """Adapter over a `transformers` tokenizer implementing the `Tokenizer` protocol."""

    def __init__(self, path: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        if not getattr(self._tok, "chat_template", None):
            raise ValueError(f"the tokenizer in {path} has no chat template")
        self.eos_token_id: int | None = self._tok.eos_token_id

    @property
    def hf(self) -> Any:
        """The underlying transformers tokenizer (pad/eos ids, batch decoding for offline evaluation)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        try:
            text = self._tok.apply_chat_template(
                messages, tools=tools or None, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # a template error is about the request's messages, not the server
            raise InvalidRequest(
                f"the model's chat template could not render these messages: {type(exc).__name__}: "
                f"{str(exc)[:200]}. Check the roles and their order.",
                param="messages",
            ) from exc
        return self.encode(str(text))
