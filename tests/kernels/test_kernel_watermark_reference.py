"""The plain-torch watermark operation (what CPU hosts run) and its host-side helpers."""

from __future__ import annotations

import math
import os

import pytest
import torch

from kernels import watermark_hash as H
from kernels.watermark import (
    apply_watermark,
    apply_watermark_reference,
    green_mask,
    gumbel_u,
    kgw_green,
    row_values,
)
from kernels.watermark_params import ContextTracker, RowParams, Scheme, WatermarkBatch

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.dtype])


def mixed_rows(seed: int) -> list[RowParams | None]:
    key = lambda i: bytes((seed * 31 + i * 7 + j) % 256 for j in range(16))  # noqa: E731
    return [
        RowParams(Scheme.KGW_LEFTHASH, key(0), [11, 12, 13]),
        None,
        RowParams(Scheme.KGW_SELFHASH, key(2), [5, 6, 7, 8, 9], gamma=0.5, delta=1.25),
        RowParams(Scheme.GUMBEL, key(3), [1, 2, 3], temperature=0.7),
        RowParams(Scheme.KGW_LEFTHASH, key(4), [11, 12, 13], skip=True),
        RowParams(Scheme.GUMBEL, key(5), [1, 2, 3], temperature=1.3, skip=True),
        RowParams(Scheme.KGW_LEFTHASH, key(6), [3], width=1, delta=-3.0),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 4099])
def test_kgw_adds_delta_to_green_tokens_only(dtype: torch.dtype, vocab: int) -> None:
    torch.manual_seed(vocab)
    rows = mixed_rows(1)
    batch = WatermarkBatch.build(rows)
    x = (torch.randn(len(rows), vocab) * 4).to(dtype)
    out = x.clone()
    apply_watermark_reference(out, batch)
    green = green_mask(batch, vocab)
    for i, row in enumerate(rows):
        if row is None or row.skip:
            assert torch.equal(bits(out[i]), bits(x[i])), f"row {i} must be untouched"
        elif row.scheme is not Scheme.GUMBEL:
            want = (x[i].float() + row.delta).to(dtype)
            assert torch.equal(bits(out[i][green[i]]), bits(want[green[i]]))
            assert torch.equal(bits(out[i][~green[i]]), bits(x[i][~green[i]]))
            assert abs(green[i].double().mean().item() - row.gamma) < 0.06
    assert not green[[1, 3, 4, 5]].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gumbel_leaves_exactly_the_perturbed_argmax(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    rows = mixed_rows(2)
    batch = WatermarkBatch.build(rows)
    x = (torch.randn(len(rows), 4099) * 3).to(dtype)
    out = x.clone()
    apply_watermark_reference(out, batch)
    values = row_values(batch, 4099)
    for i in (3,):
        finite = torch.isfinite(out[i]).nonzero().flatten()
        assert finite.numel() == 1
        winner = finite.item()
        assert bits(out[i, winner]) == bits(x[i, winner])
        u = ((values[i] >> 9) * 2 + 1).double() / 2**24  # float64 cross-check of the choice
        score = x[i].double() / rows[i].temperature - torch.log(-torch.log(u))
        assert score.argmax().item() == winner
    assert torch.equal(bits(out[5]), bits(x[5]))  # skipped Gumbel row untouched


def test_gumbel_choice_samples_softmax_of_scaled_logits() -> None:
    """Distortion-free: over many contexts the kept token follows softmax(logits / T)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    temperature, n = 0.8, 4000
    rows = [RowParams(Scheme.GUMBEL, bytes(16), [i, i + 1], temperature=temperature) for i in range(n)]
    out = logits.repeat(n, 1)
    apply_watermark_reference(out, WatermarkBatch.build(rows))
    counts = torch.isfinite(out).double().sum(dim=0)
    p = torch.softmax(logits.double() / temperature, dim=0)
    sigma = torch.sqrt(p * (1 - p) / n)
    assert torch.all((counts / n - p).abs() <= 4 * sigma), (counts / n, p)


def test_special_values_are_handled_bit_exactly() -> None:
    rows = [RowParams(Scheme.KGW_LEFTHASH, bytes(16), [1]), RowParams(Scheme.GUMBEL, bytes(16), [1])]
    vocab = 64
    green = green_mask(WatermarkBatch.build(rows), vocab)[0]
    red_at, green_at = (~green).nonzero().flatten(), green.nonzero().flatten()
    x = torch.randn(2, vocab)
    x[0, red_at[0]], x[0, red_at[1]], x[0, red_at[2]] = -0.0, float("nan"), float("-inf")
    x[0, green_at[0]], x[0, green_at[1]] = float("nan"), float("-inf")
    x[1, :] = float("nan")
    x[1, 5] = float("-inf")
    x[1, 9] = 1.0
    out = x.clone()
    apply_watermark_reference(out, WatermarkBatch.build(rows))
    untouched = torch.cat([red_at, green_at[:2]])
    assert torch.equal(bits(out[0, untouched]), bits(x[0, untouched]))  # -0.0, NaN, -inf kept
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [9]  # NaN never wins


def test_row_results_do_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(3)
    rows = mixed_rows(3)
    x = torch.randn(len(rows), 777)
    together = x.clone()
    apply_watermark_reference(together, WatermarkBatch.build(rows))
    for i, row in enumerate(rows):
        alone = x[i : i + 1].clone()
        apply_watermark_reference(alone, WatermarkBatch.build([row]))
        assert torch.equal(bits(alone[0]), bits(together[i]))


def test_apply_watermark_on_cpu_is_the_reference() -> None:
    torch.manual_seed(4)
    rows = mixed_rows(4)
    batch = WatermarkBatch.build(rows)
    x = torch.randn(len(rows), 1500)
    a, b = x.clone(), x.clone()
    apply_watermark(a, batch)
    apply_watermark_reference(b, batch)
    assert torch.equal(bits(a), bits(b))
    idle = x.clone()
    apply_watermark(idle, WatermarkBatch.build([None] * len(rows)))
    assert torch.equal(bits(idle), bits(x))
    with pytest.raises(ValueError):
        apply_watermark(x[:2], batch)


def test_detector_views_match_generation() -> None:
    key = os.urandom(16)
    contexts = [[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8]]
    candidates = torch.tensor([10, 20, 30])
    for scheme in (Scheme.KGW_LEFTHASH, Scheme.KGW_SELFHASH):
        rows = [RowParams(scheme, key, c, width=4) for c in contexts]
        mask = green_mask(WatermarkBatch.build(rows), 31)
        want = mask[torch.arange(3), candidates]
        assert torch.equal(kgw_green(key, contexts, candidates, scheme, 0.25), want)
        assert torch.equal(kgw_green(key, contexts, candidates[:, None].expand(3, 2), scheme, 0.25)[:, 1], want)
    rows = [RowParams(Scheme.GUMBEL, key, c, width=4) for c in contexts]
    values = row_values(WatermarkBatch.build(rows), 31)[torch.arange(3), candidates]
    assert torch.equal(gumbel_u(key, contexts, candidates), H.gumbel_uniform(H.u32_bits(values)))


def test_row_params_keep_the_last_width_tokens_and_validate() -> None:
    batch = WatermarkBatch.build([RowParams(Scheme.KGW_SELFHASH, bytes(16), list(range(100)))])
    assert batch.ctx_len().tolist() == [4] and batch.context()[0, :4].tolist() == [96, 97, 98, 99]
    assert batch.any_active and not batch.has_gumbel
    assert WatermarkBatch.build([RowParams(Scheme.GUMBEL, bytes(16), [1])]).has_gumbel
    skipped = WatermarkBatch.build([RowParams(Scheme.GUMBEL, bytes(16), [1], skip=True), None])
    assert not skipped.any_active and not skipped.has_gumbel
    assert batch.delta().tolist() == [2.0] and batch.threshold().tolist() == [1 << 30]
    bad = [
        dict(key=b"x" * 15),
        dict(width=9),
        dict(gamma=1.0),
        dict(delta=math.inf),
        dict(context=[-1]),
        dict(scheme=Scheme.GUMBEL, temperature=0.0),
    ]
    for kwargs in bad:
        args = dict(scheme=Scheme.KGW_LEFTHASH, key=bytes(16), context=[1]) | kwargs
        with pytest.raises(ValueError):
            RowParams(**args)


def test_step_row_swaps_context_and_keeps_the_key_out_of_reprs() -> None:
    key = b"\x13" * 16
    base = RowParams(Scheme.KGW_LEFTHASH, key, width=2, delta=3.0)
    same = RowParams(Scheme.KGW_LEFTHASH, key, [9, 8, 7], width=2, delta=3.0, skip=True)
    assert base.step_row([9, 8, 7], skip=True) == same.table_row()
    assert base.context == () and not base.skip
    assert (
        WatermarkBatch.pack([base.step_row([9, 8, 7], True)]).table.tolist()
        == WatermarkBatch.build([same]).table.tolist()
    )
    off = RowParams(Scheme.OFF, key).step_row([5, 6])
    assert off[:3] == [0, 0, 0] and off[-8:] == [0] * 8  # an OFF row carries no context
    with pytest.raises(ValueError):
        base.step_row([2**31])
    with pytest.raises(ValueError):
        base.step_row([3, -1])
    assert repr(key) not in repr(base) and "key" not in repr(base)
    assert len(WatermarkBatch.build([])) == 0 and len(WatermarkBatch.pack([])) == 0


def test_pack_derives_the_launch_flags_and_refuses_short_rows() -> None:
    gumbel = RowParams(Scheme.GUMBEL, bytes(16), [1])
    kgw = RowParams(Scheme.KGW_SELFHASH, bytes(16), [1])
    cases = [
        ([None, kgw.table_row()], True, False),
        ([gumbel.step_row([1], skip=True), kgw.table_row()], True, False),
        ([gumbel.table_row(), None], True, True),
        ([gumbel.step_row([1], skip=True), kgw.step_row([1], skip=True)], False, False),
        ([None, None], False, False),
    ]
    for rows, any_active, has_gumbel in cases:
        batch = WatermarkBatch.pack(rows)
        assert (batch.any_active, batch.has_gumbel) == (any_active, has_gumbel), rows
        assert batch.table.dtype == torch.int32 and batch.table.shape == (2, len(kgw.table_row()))
    with pytest.raises(ValueError):
        WatermarkBatch.pack([kgw.table_row()[:-1]])


def test_context_tracker_flags_repeats_once_per_position() -> None:
    tracker = ContextTracker(width=2)
    text = [7, 1, 2, 3, 1, 2, 3]
    flags = [tracker.is_repeat(text[:pos], pos) for pos in range(2, len(text) + 1)]
    assert flags == [False, False, False, False, True, True]  # (1,2) and (2,3) come back
    assert tracker.is_repeat(text[:2], 2) is False  # asking again for a position is idempotent
    assert len(tracker) == 4
    with pytest.raises(ValueError):
        ContextTracker(width=0)
