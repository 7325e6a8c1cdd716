"""The fused CPU path (`kernels.watermark_cpu`, Inductor) against the eager reference: the same bits, one
compile for every batch size, key count and vocabulary, and the eager path whenever the fused one can't run.
Logits are made in inference mode, as vLLM's sampler makes them (the fused path takes only those)."""

from __future__ import annotations

import random

import pytest
import torch
from torch._dynamo.utils import counters

from kernels import watermark_cpu
from kernels.watermark import apply_watermark, apply_watermark_reference
from kernels.watermark_params import RowParams, Scheme, WatermarkBatch
from tests.kernels.rows import random_rows


@pytest.fixture(scope="module")
def fused() -> None:
    """Compiled as a CPU engine does, here while the default dtype is another (vLLM builds its model so)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert watermark_cpu.prepare(), watermark_cpu._compiled().error
    finally:
        torch.set_default_dtype(torch.float32)


def logits_for(rng: random.Random, n_rows: int, vocab: int) -> torch.Tensor:
    x = torch.randn(n_rows, vocab, generator=torch.Generator().manual_seed(rng.getrandbits(32))) * 4
    x[:, rng.randrange(vocab)] = float("nan")
    x[:, rng.randrange(vocab)] = -0.0
    x[:, rng.randrange(vocab)] = float("-inf")
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("vocab", [31, 49_152, 50_257])
def test_fused_matches_the_reference_bit_for_bit_without_recompiling(fused, vocab: int) -> None:
    rng = random.Random(vocab)
    graphs = counters["stats"]["unique_graphs"]
    for n_rows in (1, 2, 3, 37, 1, 8):
        keys = [rng.randbytes(16) for _ in range(rng.choice([1, 1, 3]))]
        rows = random_rows(rng, n_rows, vocab, keys)
        if n_rows == 1:  # each kind alone at batch 1
            rows = [RowParams(Scheme(rng.choice([1, 2, 3])), keys[0], [1, 2, 3, 4])]
        with torch.inference_mode():
            x = logits_for(rng, n_rows, vocab)
            assert watermark_cpu.applies_to(x)
            ours, want = x.clone(), x.clone()
            apply_watermark(ours, WatermarkBatch.build(rows))
            apply_watermark_reference(want, WatermarkBatch.build(rows))
        assert same_bits(ours, want), (n_rows, vocab)
    assert counters["stats"]["unique_graphs"] == graphs, "a batch shape compiled again"
    assert watermark_cpu.ready()


def test_other_logits_take_the_eager_path(fused) -> None:
    rng = random.Random(5)
    rows = random_rows(rng, 6, 1000, [rng.randbytes(16)])
    outside = logits_for(rng, 6, 1000)  # made outside inference mode
    with torch.inference_mode():
        wide = logits_for(rng, 6, 1024)
        bf16 = logits_for(rng, 6, 1000).bfloat16()
        for x in (bf16, wide[:, :1000], outside):  # bf16; rows with a padded stride; a normal tensor
            assert not watermark_cpu.applies_to(x)
            ours, want = x.clone() if x.is_contiguous() else x, x.clone()
            apply_watermark(ours, WatermarkBatch.build(rows))
            apply_watermark_reference(want, WatermarkBatch.build(rows))
            assert torch.equal(ours.float().nan_to_num(1.5), want.float().nan_to_num(1.5))
    assert watermark_cpu.ready()  # none of them touched the fused path


def test_a_failing_fused_call_leaves_the_logits_to_the_eager_path(fused, monkeypatch) -> None:
    compiled = watermark_cpu._compiled()

    def broken(*_args):
        raise RuntimeError("inductor fell over")

    for name in ("kgw", "gumbel_u", "exp_sum", "gumbel_argmax"):
        monkeypatch.setattr(compiled, name, broken)
    monkeypatch.setattr(compiled, "ready", True)  # restored for the other tests
    monkeypatch.setattr(compiled, "error", None)
    rng = random.Random(9)
    key = rng.randbytes(16)
    rows = [RowParams(Scheme.KGW_SELFHASH, key, [4, 5]), RowParams(Scheme.GUMBEL, key, [4, 5])]
    with torch.inference_mode():
        x = logits_for(rng, 2, 500)
        assert watermark_cpu.applies_to(x)
        ours, want = x.clone(), x.clone()
        apply_watermark(ours, WatermarkBatch.build(rows))
        apply_watermark_reference(want, WatermarkBatch.build(rows))
    assert same_bits(ours, want)
    assert not watermark_cpu.ready() and not watermark_cpu.applies_to(x)
    for name in ("exp_sum", "gumbel_argmax"):  # each falls back on its own, from the first failure
        monkeypatch.setattr(compiled, "ready", True)
        with torch.inference_mode():
            x = _tied_logits(rng, 3, 500)
            gated = [RowParams(Scheme.KGW_SELFHASH, key, [1, 2, 3, 4], gate=1.0)] * 3
            ours, want = x.clone(), x.clone()
            apply_watermark(ours, WatermarkBatch.build(gated))
            apply_watermark_reference(want, WatermarkBatch.build(gated))
            assert same_bits(ours, want)
            from kernels.watermark import sample_gumbel

            gumbel = WatermarkBatch.build([RowParams(Scheme.GUMBEL, key, [1, 2, 3, 4])] * 3)
            chosen = x.clone()
            apply_watermark_reference(chosen, gumbel)
            assert torch.equal(sample_gumbel(x, gumbel), chosen.nan_to_num(float("-inf")).argmax(dim=1))
        assert not watermark_cpu.ready(), name


def test_operators_can_switch_the_fused_path_off(monkeypatch) -> None:
    monkeypatch.setenv(watermark_cpu.SWITCH, "0")
    compiled = watermark_cpu._Compiled()
    compiled.build()  # returns at once: nothing compiled
    assert not compiled.ready and compiled.error == f"switched off ({watermark_cpu.SWITCH}=0)"


def _tied_logits(rng: random.Random, n_rows: int, vocab: int) -> torch.Tensor:
    """Clean rows (no NaN/+inf, which close a gate) with near-ties at the top: gated rows open or close."""
    x = torch.randn(n_rows, vocab, generator=torch.Generator().manual_seed(rng.getrandbits(32))) * 3
    for r in range(n_rows):
        top = float(x[r].max())
        for j in range(rng.randrange(1, 7)):
            x[r, rng.randrange(vocab)] = top + 1.0 - 0.4 * j
    return x


@pytest.mark.parametrize("vocab", [31, 49_152, 50_257])
def test_gated_rows_fused_match_the_reference(fused, vocab: int) -> None:
    rng = random.Random(vocab + 1)
    touched = 0
    for n_rows in (1, 5, 33):
        rows = [
            RowParams(Scheme(rng.choice([1, 2])), rng.randbytes(16), [rng.randrange(vocab) for _ in range(4)],
                      delta=rng.choice([0.5, 2.0, 3.0]), gate=rng.choice([0.05, 0.3, 1.0]))
            for _ in range(n_rows)
        ]  # fmt: skip
        with torch.inference_mode():
            x = _tied_logits(rng, n_rows, vocab)
            ours, want = x.clone(), x.clone()
            apply_watermark(ours, WatermarkBatch.build(rows))
            apply_watermark_reference(want, WatermarkBatch.build(rows))
        assert same_bits(ours, want), (n_rows, vocab)
        touched += int((ours != x).any(dim=1).sum())
    assert touched > 0  # some gates were open


@pytest.mark.parametrize("vocab", [31, 49_152])
def test_sampler_choice_fused_matches_the_reference(fused, vocab: int) -> None:
    from kernels.watermark import sample_gumbel

    rng = random.Random(vocab + 2)
    for n_rows in (1, 4, 17):
        rows = [
            RowParams(Scheme.GUMBEL, rng.randbytes(16), [rng.randrange(vocab) for _ in range(4)]) if i % 3 else None
            for i in range(n_rows)
        ]
        batch = WatermarkBatch.build(rows)
        with torch.inference_mode():
            x = logits_for(rng, n_rows, vocab)
            x[:, : vocab // 3] = float("-inf")  # a filtered distribution, as after top-p
            chosen = sample_gumbel(x, batch)
            want = x.clone()
            apply_watermark_reference(want, batch)
        for i, row in enumerate(rows):
            if row is None:
                assert int(chosen[i]) == -1
            else:
                assert int(chosen[i]) == int(want[i].nan_to_num(float("-inf")).argmax()), (n_rows, i)
                assert chosen[i] >= vocab // 3  # never a filtered token


@pytest.mark.parametrize("vocab", [1_000, 49_152])
def test_sampler_choice_on_a_narrow_support_matches_the_reference(vocab: int) -> None:
    """After top-p most logits are -inf: the choice is scored on the live logits only (kernels.watermark.
    _filtered_gumbel), and must be the dense reference's token, with +inf, NaN and dead rows as well."""
    from kernels.watermark import _filtered_gumbel, _row_states, sample_gumbel

    rng = random.Random(vocab + 3)
    used_support_path = 0
    for case in ("narrow", "inf", "nan", "dead_row", "wide"):
        n_rows = 6
        rows = [RowParams(Scheme.GUMBEL, rng.randbytes(16), [rng.randrange(vocab) for _ in range(4)])] * n_rows
        batch = WatermarkBatch.build(rows)
        x = torch.full((n_rows, vocab), float("-inf"))
        for r in range(n_rows):
            keep = rng.sample(range(vocab), rng.randrange(1, max(2, vocab // 400)) if case != "wide" else vocab)
            x[r, keep] = torch.randn(len(keep), generator=torch.Generator().manual_seed(r)) * 2
        if case == "inf":
            x[1, rng.randrange(vocab)] = float("inf")
        if case == "nan":
            x[2, rng.randrange(vocab)] = float("nan")
        if case == "dead_row":
            x[3] = float("-inf")
        want = x.clone()
        apply_watermark_reference(want, batch)
        chosen = sample_gumbel(x, batch)
        assert torch.equal(chosen, want.nan_to_num(float("-inf")).argmax(dim=1)), case
        used_support_path += _filtered_gumbel(x, _row_states(batch.table), torch.ones(n_rows)) is not None
    assert used_support_path >= 2  # narrow and inf took the support path (nan, dead rows and wide did not)
