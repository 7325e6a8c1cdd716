"""The model's tokenizer and chat template, loaded from the local model folder only.

transformers renders chat templates in its immutable Jinja sandbox; a template that raises (or tries to
reach Python internals) becomes a 400 for the request, never a 500.
"""

from __future__ import annotations

import json
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
        self._vocab_size = max(len(self._tok), _config_vocab_size(path))

    @property
    def vocab_size(self) -> int:
        """Every id the tokenizer (base vocabulary plus added tokens, `len(tokenizer)`) or the model's output
        layer (`vocab_size` in config.json, often padded past the tokenizer) can produce.

        HF tokenizers' own `vocab_size` attribute counts the base vocabulary only, without added tokens."""
        return self._vocab_size

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


def _config_vocab_size(path: Path) -> int:
    """The output layer's size from the model folder's config.json (0 when it does not say)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    if not isinstance(config, dict):
        return 0
    text_config = config.get("text_config")
    for source in (config, text_config if isinstance(text_config, dict) else {}):
        value = source.get("vocab_size")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0
