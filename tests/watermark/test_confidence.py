"""`text_confidences`: the detector's recomputed gate, one engine call per window, every position covered."""

from __future__ import annotations

import asyncio
import math

from server.engine.fake import FakeEngine, fake_model_info
from server.watermark.confidence import NEUTRAL_TURN, TOP_K, text_confidences


class _Recording(FakeEngine):
    def __init__(self) -> None:
        super().__init__(fake_model_info("m", "cpu", 64))
        self.calls: list[list[int]] = []

    async def prompt_top_logprobs(self, prompt_token_ids, k):
        self.calls.append(list(prompt_token_ids))
        return await super().prompt_top_logprobs(prompt_token_ids, k)


def _run(engine, ids, max_len):
    async def go():
        await engine.start()
        return await text_confidences(engine, ids, max_len)

    return asyncio.run(go())


def test_each_position_is_scored_after_the_neutral_prefix():
    engine = _Recording()
    ids = [2, 3, 4, 5, 6, 8]
    conf = _run(engine, ids, 512)
    prefix = engine.tokenizer.render_chat(NEUTRAL_TURN, None)
    assert engine.calls == [[*prefix, *ids]]
    assert len(conf) == len(ids) and all(c is not None and len(c) == TOP_K for c in conf)
    # The fake model is unsure after an even token: position t's confidence follows token t - 1.
    for t in range(1, len(ids)):
        assert (conf[t][0] == math.log(0.15)) == (ids[t - 1] % 2 == 0)


def test_long_texts_are_scored_in_overlapping_windows_that_fit_the_model():
    engine = _Recording()
    ids = [(7 * i) % 250 + 1 for i in range(500)]
    max_len = 200
    conf = _run(engine, ids, max_len)
    assert len(conf) == len(ids) and all(c is not None for c in conf[1:])
    assert len(engine.calls) > 2 and all(len(call) <= max_len - 1 for call in engine.calls)
    prefix_len = len(engine.tokenizer.render_chat(NEUTRAL_TURN, None))
    for t in range(1, len(ids)):  # every position saw its real predecessor
        assert (conf[t][0] == math.log(0.15)) == (ids[t - 1] % 2 == 0), t
    assert all(call[:prefix_len] == engine.calls[0][:prefix_len] for call in engine.calls)
