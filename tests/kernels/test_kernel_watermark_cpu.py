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

    monkeypatch.setattr(compiled, "kgw", broken)
    monkeypatch.setattr(compiled, "gumbel_u", broken)
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


def test_operators_can_switch_the_fused_path_off(monkeypatch) -> None:
    monkeypatch.setenv(watermark_cpu.SWITCH, "0")
    compiled = watermark_cpu._Compiled()
    compiled.build()  # returns at once: nothing compiled
    assert not compiled.ready and compiled.error == f"switched off ({watermark_cpu.SWITCH}=0)"
