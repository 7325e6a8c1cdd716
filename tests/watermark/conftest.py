"""Shared pieces: a transport sealer, key material, and a pure-torch generator that samples through
`BatchWatermarker` and a stand-in for vLLM's sampler (no engine), so round trips run in seconds."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.watermark import sample_gumbel
from server.watermark.processor import BatchWatermarker, SamplerChannel
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


def material(
    scheme: str = "kgw-selfhash",
    key_id: str = "wk_00000000000a",
    key: bytes | None = None,
    *,
    gate: float | None = None,
    warmup: int = 0,
) -> KeyMaterial:
    """Key material; a fixed `key` makes a test that asserts a detection rate deterministic. auto/gumbel keys
    get a kgw-gated gate of 0.2 unless `gate` says otherwise."""
    if gate is None:
        gate = 0.2 if scheme in ("auto", "gumbel") else 0.0
    return KeyMaterial(
        key_id=key_id,
        scheme=scheme,
        gamma=0.25,
        delta=2.0,
        width=0,
        key=key or os.urandom(16),
        gate=gate,
        warmup=warmup,
    )


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
    channel = installed_channel()
    batch = BatchWatermarker(sealer, channel=channel)
    outputs: list[list[int]] = [[] for _ in keys]
    for i, key in enumerate(keys):
        extra = watermark_extra_args(key, temperature, sealer) if key is not None else {}
        batch.add(i, extra, outputs[i])
    for _ in range(length):
        logits = torch.randn(len(keys), vocab, generator=gen) * spread
        batch.apply(logits)
        tokens = sample_like_vllm(logits, temperature, channel, gen)
        for out, tok in zip(outputs, tokens.tolist(), strict=True):
            out.append(tok)
    return outputs


def installed_channel() -> SamplerChannel:
    channel = SamplerChannel()
    channel.installed = True  # the stand-in sampler below takes its offers
    return channel


def sample_like_vllm(
    logits: torch.Tensor, temperature: float, channel: SamplerChannel, gen: torch.Generator
) -> torch.Tensor:
    """What vLLM's sampler does after the logits processors, for one temperature and no filters: argmax
    for greedy; else scale by the temperature, let the hook choose the offered Gumbel rows and sample the
    others."""
    if temperature == 0:
        channel.take(logits.shape[0])  # vLLM's greedy path never reaches the hook: nothing must be offered
        return logits.argmax(dim=1)
    scaled = logits / temperature
    tokens = torch.multinomial(torch.softmax(scaled, dim=1), 1, generator=gen)[:, 0]
    pending = channel.take(logits.shape[0])
    if pending is None:
        return tokens
    chosen = sample_gumbel(scaled, pending)
    return torch.where(chosen >= 0, chosen, tokens)
