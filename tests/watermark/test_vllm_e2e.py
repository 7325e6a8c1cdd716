"""The watermark processor inside the real vLLM engine (CPU, default model): one engine for the module."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.engine.types import GenerationRequest, ModelInfo, SamplingOptions
from server.errors import InvalidRequest
from server.settings import ModelSettings, PoolSettings
from server.watermark.detector import detect
from server.watermark.request import watermark_extra_args
from server.watermark.types import KeyMaterial

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
KGW = KeyMaterial("wk_0000000000e1", "kgw-selfhash", 0.25, 2.0, 0, bytes(range(16)))
GUMBEL = KeyMaterial("wk_0000000000e2", "gumbel", 0.25, 2.0, 0, bytes(range(16, 32)))


@pytest.fixture(scope="module")
def engine(default_model_dir):
    from server.engine.vllm_engine import VllmEngine

    path = default_model_dir
    info = ModelInfo("SmolLM2-135M-Instruct", "v1", "0" * 64, path, 1024, "cpu", 0)
    model = ModelSettings(name=info.name, path=path, max_model_len=1024)
    eng = VllmEngine(info, model, PoolSettings(kv_cache_gib=1))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(eng.start())
    yield eng, loop
    loop.run_until_complete(eng.stop())
    loop.close()


def _generate(engine, request_id: str, temperature: float, extra_args: dict) -> list[int]:
    eng, loop = engine
    prompt = eng.tokenizer.render_chat(PROMPT, None)
    opts = SamplingOptions(max_tokens=120, temperature=temperature, seed=7, extra_args=extra_args)

    async def run() -> list[int]:
        tokens: list[int] = []
        async for update in eng.generate(GenerationRequest(request_id, prompt, opts)):
            tokens.extend(update.choices[0].token_ids)
        return tokens

    return loop.run_until_complete(run())


def test_watermarked_answers_differ_and_are_detected(engine):
    plain = _generate(engine, "plain", 0.0, {})
    marked = _generate(engine, "kgw", 0.0, watermark_extra_args(KGW, 0.0))
    assert marked != plain
    assert not detect(plain, [KGW, GUMBEL]).detected
    found = detect(marked, [GUMBEL, KGW])
    assert found.detected and found.key_id == KGW.key_id and found.scheme == "kgw-selfhash", found

    sampled = _generate(engine, "gumbel", 1.0, watermark_extra_args(GUMBEL, 1.0))
    found = detect(sampled, [KGW, GUMBEL])
    assert found.detected and found.key_id == GUMBEL.key_id and found.scheme == "gumbel", found

    forged = watermark_extra_args(KGW, 0.0)
    forged["_wm"]["d"] = 0.0001  # a weaker watermark than the handle was sealed for
    with pytest.raises(InvalidRequest):
        _generate(engine, "forged", 0.0, forged)
