"""A small synthetic model folder, signing keys, and helpers to build hostile variants of it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from server.registry.signing import Signer, Trust, generate_signing_key

TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], *, header: dict | None = None) -> bytes:
    """A safetensors file written by hand, so tests can also write headers that lie."""
    if header is None:
        header, offset = {}, 0
        for name, (dtype, shape, data) in tensors.items():
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
            offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(data for _, _, data in tensors.values())


def _tensor(seed: int, rows: int, cols: int) -> tuple[str, list[int], bytes]:
    data = bytes((seed * 31 + i * 7) % 251 for i in range(rows * cols * 2))
    return ("BF16", [rows, cols], data)


def build_model(folder: Path, seed: int = 0) -> Path:
    """config, tokenizer files, a chat template and two distinct bf16 safetensors shards (~2 KB each)."""
    folder.mkdir(parents=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 32,
        "max_position_embeddings": 64,
        "torch_dtype": "bfloat16",
        "seed": seed,
    }
    shards = [
        {
            "model.embed_tokens.weight": _tensor(seed + 1, 32, 16),
            "model.layers.0.mlp.weight": _tensor(seed + 2, 16, 16),
        },
        {"model.layers.1.mlp.weight": _tensor(seed + 3, 16, 16), "lm_head.weight": _tensor(seed + 4, 32, 16)},
    ]
    weight_map = {}
    for name, tensors in zip(SHARDS, shards, strict=True):
        (folder / name).write_bytes(safetensors_bytes(tensors))
        weight_map.update(dict.fromkeys(tensors, name))
    files = {
        "config.json": config,
        "generation_config.json": {"eos_token_id": 2, "max_new_tokens": 16},
        "model.safetensors.index.json": {"metadata": {"total_size": 3072}, "weight_map": weight_map},
        # A vocabulary token spelled like a hook name is data, not a hook: it must not be refused.
        "tokenizer.json": {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "auto_map": 1}, "merges": []}},
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"},
        "special_tokens_map.json": {"eos_token": "</s>"},
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict[str, Path]:
    """A pinned signing key and an unpinned one (private .pem, public .pub)."""
    folder = tmp_path_factory.mktemp("keys")
    pinned_pub = generate_signing_key(folder / "pinned.pem")
    other_pub = generate_signing_key(folder / "other.pem")
    return {
        "pinned": folder / "pinned.pem",
        "pinned_pub": pinned_pub,
        "other": folder / "other.pem",
        "other_pub": other_pub,
    }


@pytest.fixture
def signer(keys) -> Signer:
    return Signer(private_key=keys["pinned"])


@pytest.fixture
def trust(keys) -> Trust:
    return Trust(public_keys=(keys["pinned_pub"],))


@pytest.fixture
def model(tmp_path) -> Path:
    return build_model(tmp_path / "model")
