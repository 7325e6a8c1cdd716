"""The watermark inside the real vLLM engine (CPU, default model): one engine for the module, built as the
server builds it (logits processor and sampler hook installed through the worker extension)."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.types import GenerationRequest, ModelInfo, SamplingOptions
from server.errors import InvalidRequest
from server.settings import ModelSettings, PoolSettings
from server.watermark.confidence import text_confidences
from server.watermark.detector import detect
from server.watermark.request import watermark_extra_args
from server.watermark.types import KeyMaterial

pytestmark = pytest.mark.e2e

STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
KGW = KeyMaterial("wk_0000000000e1", "kgw-selfhash", 0.25, 2.0, 0, bytes(range(16)))
AUTO = KeyMaterial("wk_0000000000e2", "auto", 0.25, 3.0, 0, bytes(range(16, 32)), gate=1.0, warmup=32)  # defaults
MAX_LEN = 1024


@pytest.fixture(scope="module")
def engine(default_model_dir):
    from server.engine.vllm_engine import VllmEngine
    from server.watermark.vllm_adapter import vllm_watermark

    path = default_model_dir
    info = ModelInfo("SmolLM2-135M-Instruct", "v1", "0" * 64, path, MAX_LEN, "cpu", 0)
    model = ModelSettings(name=info.name, path=path, max_model_len=MAX_LEN)
    eng = VllmEngine(info, model, PoolSettings(kv_cache_gib=1), watermark=vllm_watermark())
    loop = asyncio.new_event_loop()
    loop.run_until_complete(eng.start())
    yield eng, loop
    loop.run_until_complete(eng.stop())
    loop.close()


def _generate(engine, request_id: str, messages, extra_args: dict, **sampling) -> list[int]:
    eng, loop = engine
    prompt = eng.tokenizer.render_chat(messages, None)
    opts = SamplingOptions(max_tokens=sampling.pop("max_tokens", 120), extra_args=extra_args, **sampling)

    async def run() -> list[int]:
        tokens: list[int] = []
        async for update in eng.generate(GenerationRequest(request_id, prompt, opts)):
            tokens.extend(update.choices[0].token_ids)
        return tokens

    return loop.run_until_complete(run())


def test_confident_greedy_answers_are_untouched_and_open_ended_ones_detected(engine):
    plain = _generate(engine, "france-plain", FRANCE, {}, temperature=0.0, max_tokens=30)
    assert engine[0].tokenizer.decode(plain) == "The capital of France is Paris."
    for i in range(4):  # under any key
        key = KeyMaterial(f"wk_00000000000{i}", "auto", 0.25, 3.0, 0, bytes([i]) * 16, gate=1.0, warmup=32)
        marked = _generate(
            engine, f"france-{i}", FRANCE, watermark_extra_args(key, 0.0), temperature=0.0, max_tokens=30
        )
        assert marked == plain

    story = _generate(engine, "story", STORY, watermark_extra_args(AUTO, 0.0), temperature=0.0, max_tokens=400)
    eng, loop = engine
    confidences = loop.run_until_complete(text_confidences(eng, story, MAX_LEN))
    found = detect(story, [KGW, AUTO], confidences=confidences)
    assert found.detected and found.key_id == AUTO.key_id and found.scheme == "kgw-gated", found
    unmarked = _generate(engine, "story-plain", STORY, {}, temperature=0.0, max_tokens=400)
    conf_plain = loop.run_until_complete(text_confidences(eng, unmarked, MAX_LEN))
    assert not detect(unmarked, [KGW, AUTO], confidences=conf_plain).detected


def test_sampled_answers_carry_gumbel_with_top_p_and_penalties(engine):
    sampled = _generate(
        engine, "gumbel", STORY, watermark_extra_args(AUTO, 0.9), temperature=0.9, top_p=0.9, presence_penalty=0.5
    )
    found = detect(sampled, [KGW, AUTO])
    assert found.detected and found.key_id == AUTO.key_id and found.scheme == "gumbel", found
    plain = _generate(engine, "unmarked", STORY, {}, temperature=0.9, top_p=0.9, presence_penalty=0.5)
    assert not detect(plain, [KGW, AUTO]).detected


def test_kgw_keys_still_mark_every_request_and_forgeries_are_refused(engine):
    plain = _generate(engine, "kgw-plain", STORY, {}, temperature=0.0)
    marked = _generate(engine, "kgw", STORY, watermark_extra_args(KGW, 0.0), temperature=0.0)
    assert marked != plain
    found = detect(marked, [AUTO, KGW])
    assert found.detected and found.key_id == KGW.key_id and found.scheme == "kgw-selfhash", found

    forged = watermark_extra_args(KGW, 0.0)
    forged["_wm"]["d"] = 0.0001  # a weaker watermark than the handle was sealed for
    with pytest.raises(InvalidRequest):
        _generate(engine, "forged", STORY, forged, temperature=0.0)


def test_scoring_a_text_returns_the_models_own_top_logprobs(engine):
    eng, loop = engine
    prompt = eng.tokenizer.render_chat(FRANCE, None)
    answer = eng.tokenizer.encode("The capital of France is Paris.")
    scored = loop.run_until_complete(eng.prompt_top_logprobs([*prompt, *answer], 2))
    assert scored[0] is None and len(scored) == len(prompt) + len(answer)
    paris = scored[len(prompt) + answer.index(eng.tokenizer.encode(" Paris")[0])]
    assert paris is not None and len(paris) == 2 and paris[0] >= paris[1] and paris[0] > -0.5  # p(Paris) > 0.6
