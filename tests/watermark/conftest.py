"""Shared pieces: a transport sealer, key material, and a pure-torch generator that samples through
`BatchWatermarker` (no engine), so round trips run in seconds."""

from __future__ import annotations

import os

import pytest
import torch

from server.watermark.processor import BatchWatermarker
from server.watermark.request import watermark_extra_args
from server.watermark.transport import KeySealer
from server.watermark.types import KeyMaterial

VOCAB = 1500
MODEL = "SmolLM2-135M-Instruct"


def fake_app(tmp_path, **overrides):  # type: ignore[no-untyped-def]
    """The whole app over the in-process engine (one model, `MODEL`), with a fast password hasher."""
    import hashlib
    from pathlib import Path

    from server.app import create_app
    from server.engine.fake import FakeEngine
    from server.engine.types import ModelInfo
    from server.identity.passwords import PasswordHasher
    from server.settings import load_settings

    info = ModelInfo(MODEL, "v1", hashlib.sha256(b"fake model").hexdigest(), Path("."), 512, "cpu", 1_700_000_000)
    return create_app(
        load_settings(data_dir=tmp_path, engine="fake", **overrides),
        engine_factory=lambda info: FakeEngine(info),
        resolver=lambda s, db: [info],
        password_hasher=PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1),
    )


def material(scheme: str = "kgw-selfhash", key_id: str = "wk_00000000000a", key: bytes | None = None) -> KeyMaterial:
    """Key material; a fixed `key` makes a test that asserts a detection rate deterministic."""
    return KeyMaterial(key_id=key_id, scheme=scheme, gamma=0.25, delta=2.0, width=0, key=key or os.urandom(16))


@pytest.fixture
def sealer() -> KeySealer:
    return KeySealer(os.urandom(32))


def generate(
    sealer: KeySealer,
    keys: list[KeyMaterial | None],
    length: int,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    vocab: int = VOCAB,
    spread: float = 2.5,
) -> list[list[int]]:
    """One sequence per entry of `keys` (None: unwatermarked), sampled together as one batch from random
    logits (`spread` sets their entropy) after the batch watermarker ran."""
    gen = torch.Generator().manual_seed(seed)
    batch = BatchWatermarker(sealer)
    outputs: list[list[int]] = [[] for _ in keys]
    for i, key in enumerate(keys):
        extra = watermark_extra_args(key, temperature, sealer) if key is not None else {}
        prompt = torch.randint(0, vocab, (6,), generator=gen).tolist()
        batch.add(i, extra, outputs[i], prompt)
    for _ in range(length):
        logits = torch.randn(len(keys), vocab, generator=gen) * spread
        batch.apply(logits)
        if temperature == 0:
            tokens = logits.argmax(dim=1)
        else:
            tokens = torch.multinomial(torch.softmax(logits / temperature, dim=1), 1, generator=gen)[:, 0]
        for out, tok in zip(outputs, tokens.tolist(), strict=True):
            out.append(tok)
    return outputs
