"""The model's confidence at each position of a text: kgw-gated's gate, recomputed for detection.

Generation biased a greedy position only where the model was unsure there (`kernels.watermark_gate`).
The detector does not see the prompt, so it scores the text as the start of a chat answer: after the
model's chat template rendered for an empty user turn, the neutral prefix that best matched generation's
gates in our measurements (docs/watermark.md). Texts longer than the model's context are scored in
windows that overlap by up to 256 tokens, so every position keeps some context.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.engine.types import Engine

TOP_K = 2  # the gate needs the top probability and the runner-up's
NEUTRAL_TURN = [{"role": "user", "content": ""}]
_OVERLAP = 256


async def text_confidences(
    engine: Engine, token_ids: Sequence[int], max_model_len: int
) -> list[tuple[float, ...] | None]:
    """For each token of `token_ids`, the model's top-`TOP_K` log-probabilities of that position."""
    ids = list(token_ids)
    prefix = list(engine.tokenizer.render_chat(NEUTRAL_TURN, None))
    room = max_model_len - 1 - len(prefix)  # the engine generates one token after the prompt
    if room < 2 * _OVERLAP // 4:
        prefix, room = [], max_model_len - 1
    overlap = min(_OVERLAP, room // 4)
    out: list[tuple[float, ...] | None] = []
    start = 0
    while start < len(ids):
        begin = max(0, start - overlap)
        end = min(len(ids), begin + room)
        scored = await engine.prompt_top_logprobs([*prefix, *ids[begin:end]], TOP_K)
        base = len(prefix) - begin
        out.extend(scored[base + start : base + end])
        start = end
    return out
