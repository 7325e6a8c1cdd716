"""Detector statistics: exact tails, what is scored, the multiple-testing correction."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from kernels import watermark_hash as H
from kernels.watermark import green_mask
from kernels.watermark_params import RowParams, Scheme, WatermarkBatch
from server.watermark.detector import detect, gumbel_p_value, kgw_p_value, scored_positions
from server.watermark.types import KeyMaterial
from tests.watermark.conftest import material


@pytest.mark.parametrize("n", [1, 5, 9, 12])
@pytest.mark.parametrize("p0", [0.25, 0.5, 0.1])
def test_binomial_tail_matches_enumeration(n, p0):
    q = Fraction(p0)
    tail = [Fraction(0)] * (n + 2)
    for outcome in itertools.product((0, 1), repeat=n):
        g = sum(outcome)
        prob = q**g * (1 - q) ** (n - g)
        for k in range(g + 1):
            tail[k] += prob
    for g in range(n + 1):
        assert kgw_p_value(g, n, p0) == pytest.approx(float(tail[g]), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("n", [1, 2, 16, 60])
def test_gamma_tail_matches_the_erlang_sum(n):
    for x in (0.5, n / 2, n, 1.5 * n + 3, 3 * n + 10):
        erlang = math.exp(-x) * math.fsum(x**k / math.factorial(k) for k in range(n))
        assert gumbel_p_value(x, n) == pytest.approx(erlang, rel=1e-9)


def test_gumbel_tail_is_conservative_for_the_discrete_uniform():
    """Under H0 each term is -log(1 - u) with u on the kernel's 2**-24 grid: the Gamma tail must not
    understate the probability of a large score (Monte Carlo, 200k sums of 16 terms)."""
    gen = torch.Generator().manual_seed(3)
    values = H.u32_bits(torch.randint(0, 2**32, (200_000, 16), generator=gen, dtype=torch.int64))
    scores = (-torch.log1p(-H.gumbel_uniform(values).double())).sum(dim=1)
    for x in (20.0, 24.0, 28.0, 32.0):
        empirical = float((scores >= x).double().mean())
        bound = gumbel_p_value(x, 16)
        assert empirical <= bound + 4 * math.sqrt(bound / 200_000) + 1e-6


def test_kgw_score_equals_a_brute_force_count_over_the_vocabulary():
    key = material("kgw-selfhash")
    rng = random.Random(5)
    tokens = rng.sample(range(4000), 80)  # distinct tokens: every position is a distinct hash input
    green = scored = 0
    seen = set()
    for t in range(4, len(tokens)):
        ctx = tuple(tokens[t - 4 : t])
        if ctx in seen:
            continue
        seen.add(ctx)
        mask = green_mask(WatermarkBatch.build([RowParams(Scheme.KGW_SELFHASH, key=key.key, context=ctx)]), 4000)
        scored += 1
        green += bool(mask[0, tokens[t]])
    result = detect(tokens, [key], min_tokens=1, threshold=1.0)
    assert result.tokens_scored == scored == 76
    assert result.green_fraction == pytest.approx(green / scored)
    assert result.p_value == pytest.approx(kgw_p_value(green, scored, 0.25), rel=1e-12)


def test_repeated_contexts_are_scored_once():
    key = material("kgw-lefthash")
    cycle = list(range(100, 130))
    once = detect(cycle + [100], [key], min_tokens=1, threshold=1.0)
    ten = detect(cycle * 10, [key], min_tokens=1, threshold=1.0)
    assert once.tokens_scored == ten.tokens_scored == 30
    assert once.p_value == ten.p_value


def test_selfhash_scores_each_hash_input_once():
    """A frequent token that holds its window's minimum hash has a colour fixed by the key alone; it is
    scored once however many distinct contexts precede it."""
    key = material("kgw-selfhash")
    kh = H.murmur3_words([*H.key_words(key.key), 2])
    h = {t: H.fmix32(kh ^ H.token_mix(t)) for t in range(2000)}
    low = min(h, key=h.get)  # the token with the smallest keyed hash: always its window's minimum
    rng = random.Random(1)
    tokens = []
    for _ in range(100):
        tokens += [rng.randrange(2000) for _ in range(4)] + [low]
    keep = scored_positions(tokens, key.key, Scheme.KGW_SELFHASH, 4)
    assert sum(tokens[t] == low for t in keep) == 1
    assert len(keep) > 350


def test_too_few_tokens_no_keys_and_bad_ids():
    key = material()
    short = detect([1, 2, 3, 4, 5, 6, 7, 8], [key])
    assert (short.detected, short.reason, short.key_id) == (False, "too_few_tokens", None)
    assert detect(list(range(50)), []).reason == "no_keys"
    with pytest.raises(ValueError):
        detect([1, 2, 70_000], [key], vocab_size=50_000)
    with pytest.raises(ValueError):
        detect([1, -2, 3], [key])
    assert "reason" not in detect(list(range(50)), [key]).as_dict()


def test_bonferroni_counts_every_key_and_scheme():
    key = material("kgw-selfhash")
    rng = random.Random(9)
    tokens = [rng.randrange(1000) for _ in range(60)]
    alone = detect(tokens, [key], threshold=1.0)
    twins = [KeyMaterial(f"wk_00000000000{i}", "kgw-selfhash", 0.25, 2.0, 0, key.key) for i in range(3)]
    assert detect(tokens, twins, threshold=1.0).p_value == pytest.approx(min(1.0, 3 * alone.p_value))
    # An auto key may carry Gumbel or KGW selfhash: it counts as two tests.
    auto = KeyMaterial("wk_00000000000f", "auto", 0.25, 2.0, 0, key.key)
    assert detect(tokens, [auto], threshold=1.0).p_value <= min(1.0, 2 * alone.p_value) + 1e-12


def _greedy_with_confidences(sealer, key, length: int, seed: int, vocab: int = 1500):
    """Greedy text through the batch watermarker where every other position is confident (one logit far
    ahead) and the rest unsure with near-ties; returns the tokens and each position's top-2 log-probs."""
    from server.watermark.processor import BatchWatermarker
    from server.watermark.request import watermark_extra_args

    gen = torch.Generator().manual_seed(seed)
    batch = BatchWatermarker(sealer)
    out: list[int] = []
    conf: list[tuple[float, float]] = []
    batch.add(0, watermark_extra_args(key, 0.0, sealer), out)
    for step in range(length):
        logits = torch.randn(1, vocab, generator=gen)
        if step % 2:
            logits[0, int(torch.randint(vocab, (1,), generator=gen))] += 12.0  # confident
        else:
            logits[0, torch.randint(vocab, (8,), generator=gen)] += 4.0  # unsure: near-ties at the top
        top = torch.topk(logits.log_softmax(-1)[0], 2).values
        conf.append((float(top[0]), float(top[1])))
        batch.apply(logits)
        out.append(int(logits.argmax()))
    return out, conf


def test_gated_detection_scores_the_unsure_positions_it_can_recompute(sealer):
    key = material("auto", key=bytes(range(16)), gate=0.5)
    tokens, conf = _greedy_with_confidences(sealer, key, 160, seed=3)
    gated = detect(tokens, [key], threshold=1.0, confidences=conf)
    ungated = detect(tokens, [key], threshold=1.0)
    assert gated.scheme == "kgw-gated" and gated.tokens_scored <= 80  # only the unsure half
    assert gated.p_value < 1e-8 and gated.p_value < ungated.p_value / 100  # the confident half only dilutes
    assert detect(tokens, [key], threshold=1e-4, confidences=conf).scheme == "kgw-gated"
    with pytest.raises(ValueError):
        detect(tokens, [key], confidences=conf[:-1])


def test_gated_selection_keeps_the_test_exact_under_h0():
    """The gate depends on the text (through the model), never on the key: unwatermarked texts with any
    confidences stay under the threshold at its nominal rate."""
    rng = random.Random(4)
    keys = [material("auto", key=bytes([i]) * 16, gate=0.5) for i in range(2)]
    p_values = []
    for _ in range(600):
        tokens = [rng.randrange(3000) for _ in range(120)]
        conf = [(math.log(rng.choice([0.1, 0.3, 0.9])), math.log(0.05)) for _ in tokens]
        p_values.append(detect(tokens, keys, threshold=1.0, confidences=conf).p_value)
    for level in (0.01, 0.05, 0.2):
        rate = sum(p < level for p in p_values) / len(p_values)
        assert rate <= level + 3 * math.sqrt(level / len(p_values)), (level, rate)


def test_gate_selector_follows_gate_delta_and_warmup():
    from server.watermark.detector import gate_selector

    key = material("auto", gate=0.3, warmup=3)
    unsure, sure, no_tie = (math.log(0.2), math.log(0.15)), (math.log(0.9), math.log(0.05)), (math.log(0.2), -9.0)
    selected = gate_selector(key, [unsure, unsure, unsure, unsure, sure, no_tie, None])
    assert selected is not None
    assert [selected(t) for t in range(8)] == [False, False, False, True, False, False, False, False]
    assert gate_selector(key, None) is None and gate_selector(material("auto", gate=0.0), [unsure]) is None
