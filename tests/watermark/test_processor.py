"""`BatchWatermarker` on CPU with fake batches: slot bookkeeping, untouched rows, repeated contexts, the
first positions of an answer, confidence-gated greedy rows and the hand-off of Gumbel rows to the sampler."""

from __future__ import annotations

import pytest
import torch

from kernels.watermark import apply_watermark, green_mask
from kernels.watermark_params import RowParams, Scheme, WatermarkBatch
from server.watermark import processor as processor_module
from server.watermark.processor import BatchWatermarker, SamplerChannel
from server.watermark.request import watermark_extra_args
from tests.watermark.conftest import installed_channel, material

V = 777  # odd on purpose


def _expected(key, context, logits_row, scheme=Scheme.KGW_SELFHASH, temperature=1.0):
    row = RowParams(scheme, key=key.key, context=context, temperature=temperature)
    out = logits_row.clone()[None]
    apply_watermark(out, WatermarkBatch.build([row]))
    return out[0]


def test_marked_rows_match_the_kernel_and_other_rows_keep_their_bits(sealer):
    key = material()
    batch = BatchWatermarker(sealer)
    outputs = [[2, 3, 5, 6], [], [7, 8, 9, 10, 11]]
    batch.add(0, watermark_extra_args(key, 1.0, sealer), outputs[0])
    assert not batch.add(1, {"unrelated": 1}, outputs[1])
    batch.add(2, watermark_extra_args(key, 1.0, sealer), outputs[2])
    logits = torch.randn(4, V)
    logits[1, 3] = float("nan")
    logits[3, 4] = -0.0
    before = logits.clone()
    assert batch.apply(logits) is logits
    assert torch.equal(logits[0], _expected(key, [2, 3, 5, 6], before[0]))
    assert torch.equal(logits[2], _expected(key, [8, 9, 10, 11], before[2]))
    assert before[1:2].view(torch.int32).equal(logits[1:2].view(torch.int32))  # NaN and all: bit for bit
    assert before[3:].view(torch.int32).equal(logits[3:].view(torch.int32))


def test_context_follows_the_live_output_list(sealer):
    key = material("kgw-lefthash")  # width 1: the context is the last token
    out: list[int] = [42]
    batch = BatchWatermarker(sealer)
    batch.add(0, watermark_extra_args(key, 1.0, sealer), out)
    for history, sampled in (([42], 17), ([42, 17], 99), ([42, 17, 99], 3)):
        logits = torch.zeros(1, V)
        batch.apply(logits)
        rp = RowParams(Scheme.KGW_LEFTHASH, key=key.key, context=history)
        assert torch.equal(logits[0] > 0, green_mask(WatermarkBatch.build([rp]), V)[0])
        out.append(sampled)  # the engine appends to its list; we hold a reference


def test_no_watermarked_rows_is_a_no_op_that_builds_nothing(sealer, monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("built a batch for nothing")

    monkeypatch.setattr(processor_module.WatermarkBatch, "pack", boom)
    batch = BatchWatermarker(sealer)
    batch.add(0, None, [])
    batch.add(1, {}, [])
    logits = torch.randn(2, V)
    before = logits.clone()
    assert batch.apply(logits) is logits and torch.equal(logits, before) and len(batch) == 0


def test_remove_move_and_swap(sealer):
    a, b = material(key_id="wk_00000000000a"), material(key_id="wk_00000000000b")  # selfhash, width 4
    batch = BatchWatermarker(sealer)
    out_a, out_b = [1, 2, 3, 4], [5, 6, 7, 8]
    batch.add(0, watermark_extra_args(a, 1.0, sealer), out_a)
    batch.add(3, watermark_extra_args(b, 1.0, sealer), out_b)

    def marked_rows(n=4):
        logits = torch.zeros(n, V)
        batch.apply(logits)
        out = {}
        for i in range(n):
            for key, hist in ((a, out_a), (b, out_b)):
                if (logits[i] != 0).any() and torch.equal(logits[i], _expected(key, hist[-4:], torch.zeros(V))):
                    out[i] = key.key_id
        return out

    assert marked_rows() == {0: a.key_id, 3: b.key_id}
    batch.move(0, 3, swap=True)
    assert marked_rows() == {3: a.key_id, 0: b.key_id}
    batch.move(3, 1, swap=False)  # condense: slot 3 moves to the free slot 1
    assert marked_rows() == {1: a.key_id, 0: b.key_id}
    batch.move(2, 0, swap=False)  # an unmarked request replaces slot 0
    assert marked_rows() == {1: a.key_id}
    batch.add(1, None, [])  # an unmarked request takes the slot
    assert marked_rows() == {} and len(batch) == 0
    batch.add(2, watermark_extra_args(a, 1.0, sealer), out_a)
    batch.remove(2)
    assert len(batch) == 0


@pytest.mark.parametrize("pin_memory", [False, True])  # pinning applies to CUDA logits only; CPU ignores it
def test_repeated_contexts_are_left_untouched(sealer, pin_memory):
    key = material("kgw-lefthash")
    out = [10]
    batch = BatchWatermarker(sealer, pin_memory=pin_memory)
    batch.add(0, watermark_extra_args(key, 1.0, sealer), out)
    first = torch.zeros(1, V)
    batch.apply(first)  # context (10,) first seen at position 1
    assert (first != 0).any()
    replay = torch.zeros(1, V)
    batch.apply(replay)  # the same step again (a recomputed step): same answer
    assert torch.equal(first, replay)
    out.extend([11, 10])
    again = torch.zeros(1, V)
    batch.apply(again)  # context (10,) again at position 3: untouched
    assert torch.equal(again, torch.zeros(1, V))


def test_gumbel_rows_are_left_to_the_sampler_hook(sealer):
    key = material("gumbel")
    channel = installed_channel()
    batch = BatchWatermarker(sealer, channel=channel)
    out = [1, 2, 3, 4]
    batch.add(1, watermark_extra_args(key, 0.5, sealer), out)
    batch.add(0, watermark_extra_args(material(), 1.0, sealer), [5, 6, 7, 8])  # a KGW row beside it
    logits = torch.randn(2, V)
    before = logits.clone()
    batch.apply(logits)
    assert torch.equal(logits[1], before[1])  # the processor never touches a sampled row's logits
    assert not torch.equal(logits[0], before[0])
    offered = channel.take(2)
    assert offered is not None and offered.has_gumbel and not offered.table.is_cuda
    expected = WatermarkBatch.build([None, RowParams(Scheme.GUMBEL, key=key.key, context=out, temperature=1.0)])
    assert torch.equal(offered.table, expected.table)  # temperature 1: vLLM has scaled the logits already
    assert channel.take(2) is None  # taken once
    with pytest.raises(RuntimeError):
        batch.apply(logits)
        channel.take(3)  # a sampler call over another batch shape never gets these rows


def test_a_gumbel_row_without_the_sampler_hook_fails_closed(sealer):
    batch = BatchWatermarker(sealer, channel=SamplerChannel())  # not installed
    batch.add(0, watermark_extra_args(material("gumbel"), 1.0, sealer), [1, 2, 3, 4])
    with pytest.raises(RuntimeError, match="sampler hook"):
        batch.apply(torch.randn(1, V))
    greedy = BatchWatermarker(sealer, channel=SamplerChannel())  # greedy rows need no hook
    greedy.add(0, watermark_extra_args(material("gumbel"), 0.0, sealer), [1, 2, 3, 4])
    greedy.apply(torch.randn(1, V))


def test_placeholders_are_never_hashed(sealer):
    key = material("kgw-lefthash")
    out = [5, -1]  # an asynchronous-scheduling placeholder in the context of position 2
    batch = BatchWatermarker(sealer)
    batch.add(0, watermark_extra_args(key, 1.0, sealer), out)
    logits = torch.zeros(1, V)
    batch.apply(logits)
    assert torch.equal(logits, torch.zeros(1, V)) and batch.placeholder_steps == 1
    out[-1] = 6  # repaired in place
    batch.apply(logits)
    assert (logits != 0).any()


def test_a_slot_outside_the_logits_fails_loudly(sealer):
    batch = BatchWatermarker(sealer)
    batch.add(5, watermark_extra_args(material(), 1.0, sealer), [1, 2, 3, 4, 5])
    with pytest.raises(RuntimeError):
        batch.apply(torch.zeros(2, V))


def test_malformed_entries_are_refused_on_add(sealer):
    extra = watermark_extra_args(material(), 1.0, sealer)
    extra["_wm"]["w"] = 2
    with pytest.raises(ValueError):
        BatchWatermarker(sealer).add(0, extra, [])


def test_a_resumed_request_skips_the_contexts_it_already_used(sealer):
    """After preemption vLLM re-adds the request with its output so far: repeats stay skipped."""
    key = material("kgw-lefthash")
    extra = watermark_extra_args(key, 1.0, sealer)
    out = [10, 11, 12]
    resumed = BatchWatermarker(sealer)
    resumed.add(0, extra, out)  # contexts (10,), (10,) again, (11,) were used before preemption
    logits = torch.zeros(1, V)
    resumed.apply(logits)  # context (12,) is new: marked
    assert (logits != 0).any()
    out.append(11)
    logits = torch.zeros(1, V)
    resumed.apply(logits)  # context (11,) was used before the preemption: untouched
    assert torch.equal(logits, torch.zeros(1, V))


@pytest.mark.parametrize("scheme, temperature", [("kgw-selfhash", 1.0), ("auto", 0.0), ("gumbel", 0.8)])
def test_positions_whose_context_reaches_into_the_prompt_are_never_marked(sealer, scheme, temperature):
    """The detector scores only contexts inside the answer; marking earlier positions costs quality for nothing."""
    channel = installed_channel()
    batch = BatchWatermarker(sealer, channel=channel)
    out: list[int] = []
    batch.add(0, watermark_extra_args(material(scheme, warmup=0), temperature, sealer), out)
    for sampled in (21, 22, 23, 24):
        logits = _unsure_logits()
        before = logits.clone()
        batch.apply(logits)
        assert torch.equal(logits, before) and channel.take(1) is None, len(out)
        out.append(sampled)
    logits = _unsure_logits()
    before = logits.clone()
    batch.apply(logits)
    assert not torch.equal(logits, before) or channel.take(1) is not None  # position 4: full context, marked


def _unsure_logits(seed: int = 0) -> torch.Tensor:
    """A row where the model is unsure (top probability well under 0.2) with many near-ties at the top."""
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(seed))
    logits[0, :40] = 3.0 - torch.arange(40) * 0.02
    return logits


def test_gated_rows_bias_only_unsure_positions_and_only_their_near_ties(sealer):
    key = material("auto", gate=0.2, warmup=0)  # greedy requests under an auto key: kgw-gated
    batch = BatchWatermarker(sealer)
    out = [3, 4, 5, 6]
    batch.add(0, watermark_extra_args(key, 0.0, sealer), out)
    unsure = _unsure_logits()
    before = unsure.clone()
    batch.apply(unsure)
    changed = (unsure != before)[0]
    assert changed.any()
    floor = float(before.max()) - key.delta
    assert bool((before[0, changed] >= floor).all())  # only logits a greedy choice could move to
    green = green_mask(WatermarkBatch.build([RowParams(Scheme.KGW_SELFHASH, key=key.key, context=out)]), V)[0]
    assert torch.equal(changed, green & (before[0] >= floor))
    assert torch.equal(unsure[0, changed], before[0, changed] + key.delta)

    out.append(7)
    sure = torch.full((1, V), -5.0)
    sure[0, 11] = 9.0  # top probability ~0.99: the model is confident, nothing is touched
    before = sure.clone()
    batch.apply(sure)
    assert torch.equal(sure, before)


def test_gated_rows_wait_for_the_warmup(sealer):
    key = material("auto", gate=0.2, warmup=6)
    batch = BatchWatermarker(sealer)
    out = [3, 4, 5, 6, 7]
    batch.add(0, watermark_extra_args(key, 0.0, sealer), out)
    logits = _unsure_logits()
    before = logits.clone()
    batch.apply(logits)  # position 5 < warmup
    assert torch.equal(logits, before)
    out.append(8)
    batch.apply(logits)  # position 6
    assert not torch.equal(logits, before)
