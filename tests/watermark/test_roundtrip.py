"""Sample through `BatchWatermarker` (pure torch, random logits), then detect: right key, nobody else's,
and unwatermarked text stays below the threshold at the measured rate."""

from __future__ import annotations

import math
import random

import pytest

from server.watermark.detector import detect
from tests.watermark.conftest import VOCAB, generate, material

THRESHOLD = 1e-4  # WatermarkSettings.detect_p_threshold


@pytest.mark.parametrize(
    "scheme, temperature",
    [("kgw-selfhash", 1.0), ("kgw-lefthash", 1.0), ("kgw-selfhash", 0.0), ("gumbel", 0.8), ("auto", 0.0)],
)
def test_detected_with_the_right_key_and_not_with_another_orgs(sealer, scheme, temperature):
    mine = material(scheme, key_id="wk_000000000001", key=bytes(range(16)))
    default = material("kgw-selfhash", key_id="wk_000000000002", key=bytes(range(1, 17)))
    other_org = material(scheme, key_id="wk_000000000003", key=bytes(range(2, 18)))
    texts = generate(sealer, [mine] * 6, 150, temperature=temperature, seed=len(scheme) * 10 + int(temperature * 10))
    for tokens in texts:
        found = detect(tokens, [default, mine], threshold=THRESHOLD)
        assert found.detected and found.key_id == mine.key_id, found
        assert not detect(tokens, [other_org, default], threshold=THRESHOLD).detected


def test_rows_of_one_batch_keep_their_own_keys(sealer):
    a = material(key_id="wk_00000000000a", key=bytes(range(16)))
    b = material("gumbel", key_id="wk_00000000000b", key=bytes(range(1, 17)))
    texts = generate(sealer, [a, None, b, a, None], 120, seed=4)
    verdicts = [detect(t, [a, b], threshold=THRESHOLD) for t in texts]
    assert [v.key_id for v in verdicts] == [a.key_id, None, b.key_id, a.key_id, None]


def test_survives_replacing_a_fifth_of_the_tokens(sealer):
    key = material(key=bytes(range(16)))
    rng = random.Random(2)
    for tokens in generate(sealer, [key] * 6, 200, seed=8):
        edited = [rng.randrange(VOCAB) if rng.random() < 0.2 else t for t in tokens]
        assert detect(edited, [key], threshold=THRESHOLD).detected


def test_unwatermarked_false_positive_rate(sealer):
    """2,000 unwatermarked samples of the same sampler, tested against three keys (four tests)."""
    keys = [material(s, key=bytes([i]) * 16) for i, s in enumerate(("kgw-selfhash", "kgw-lefthash", "auto"))]
    texts = []
    for seed in range(8):
        texts += generate(sealer, [None] * 250, 64, seed=100 + seed)
    p_values = [detect(t, keys, threshold=THRESHOLD).p_value for t in texts]
    n = len(p_values)
    assert sum(p < THRESHOLD for p in p_values) <= 2  # expected at most 0.2
    for alpha in (0.01, 0.05):  # the adjusted p-values are (super-)uniform: FWER bounded at every level
        assert sum(p < alpha for p in p_values) <= alpha * n + 3 * math.sqrt(alpha * n)


def test_repetitive_text_is_not_a_false_positive(sealer):
    """Loops and a frequent token: exactly the texts that fool a detector that scores every position."""
    keys = [material("kgw-selfhash", key=b"s" * 16), material("kgw-lefthash", key=b"l" * 16)]
    rng = random.Random(11)
    hits = 0
    for _ in range(300):
        cycle = [rng.randrange(VOCAB) for _ in range(12)]
        loop = cycle * 15
        comma = [t for _ in range(40) for t in (rng.randrange(VOCAB), rng.randrange(VOCAB), 7)]
        hits += sum(detect(t, keys, threshold=0.01).detected for t in (loop, comma))
    assert hits <= 600 * 0.01 + 3 * math.sqrt(6)
