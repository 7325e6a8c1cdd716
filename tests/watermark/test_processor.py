"""`BatchWatermarker` on CPU with fake batches: slot bookkeeping, untouched rows, repeated contexts."""

from __future__ import annotations

import pytest
import torch

from kernels.watermark import apply_watermark, green_mask
from kernels.watermark_params import RowParams, Scheme, WatermarkBatch
from server.watermark import processor as processor_module
from server.watermark.processor import BatchWatermarker
from server.watermark.request import watermark_extra_args
from tests.watermark.conftest import material

V = 777  # odd on purpose


def _expected(key, context, logits_row, scheme=Scheme.KGW_SELFHASH, temperature=1.0):
    row = RowParams(scheme, key=key.key, context=context, temperature=temperature)
    out = logits_row.clone()[None]
    apply_watermark(out, WatermarkBatch.build([row]))
    return out[0]


def test_marked_rows_match_the_kernel_and_other_rows_keep_their_bits(sealer):
    key = material()
    batch = BatchWatermarker(sealer)
    outputs = [[5, 6], [], [7, 8, 9, 10, 11]]
    batch.add(0, watermark_extra_args(key, 1.0, sealer), outputs[0], [1, 2, 3])
    assert not batch.add(1, {"unrelated": 1}, outputs[1], [1])
    batch.add(2, watermark_extra_args(key, 1.0, sealer), outputs[2], None)
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
    out: list[int] = []
    batch = BatchWatermarker(sealer)
    batch.add(0, watermark_extra_args(key, 1.0, sealer), out, [42])
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
    batch.add(0, None, [], [1])
    batch.add(1, {}, [], [1])
    logits = torch.randn(2, V)
    before = logits.clone()
    assert batch.apply(logits) is logits and torch.equal(logits, before) and len(batch) == 0


def test_remove_move_and_swap(sealer):
    a, b = material(key_id="wk_00000000000a"), material(key_id="wk_00000000000b")
    batch = BatchWatermarker(sealer)
    out_a, out_b = [1, 2, 3, 4], [5, 6, 7, 8]
    batch.add(0, watermark_extra_args(a, 1.0, sealer), out_a, [])
    batch.add(3, watermark_extra_args(b, 1.0, sealer), out_b, [])

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
    batch.add(1, None, [], [])  # an unmarked request takes the slot
    assert marked_rows() == {} and len(batch) == 0
    batch.add(2, watermark_extra_args(a, 1.0, sealer), out_a, [])
    batch.remove(2)
    assert len(batch) == 0


@pytest.mark.parametrize("pin_memory", [False, True])  # pinning applies to CUDA logits only; CPU ignores it
def test_repeated_contexts_are_left_untouched(sealer, pin_memory):
    key = material("kgw-lefthash")
    out = [10]
    batch = BatchWatermarker(sealer, pin_memory=pin_memory)
    batch.add(0, watermark_extra_args(key, 1.0, sealer), out, [])
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


def test_gumbel_rows_leave_one_choice_and_respect_temperature(sealer):
    key = material("gumbel")
    out = [1, 2, 3, 4]
    batch = BatchWatermarker(sealer)
    batch.add(0, watermark_extra_args(key, 0.5, sealer), out, [])
    logits = torch.randn(1, V)
    before = logits.clone()
    batch.apply(logits)
    assert int(torch.isfinite(logits).sum()) == 1
    assert torch.equal(logits[0], _expected(key, out, before[0], Scheme.GUMBEL, 0.5))


def test_placeholders_are_never_hashed(sealer):
    key = material("kgw-lefthash")
    out = [5, -1]  # an asynchronous-scheduling placeholder
    batch = BatchWatermarker(sealer)
    batch.add(0, watermark_extra_args(key, 1.0, sealer), out, [])
    logits = torch.zeros(1, V)
    batch.apply(logits)
    assert torch.equal(logits, torch.zeros(1, V)) and batch.placeholder_steps == 1
    out[-1] = 6  # repaired in place
    batch.apply(logits)
    assert (logits != 0).any()


def test_a_slot_outside_the_logits_fails_loudly(sealer):
    batch = BatchWatermarker(sealer)
    batch.add(5, watermark_extra_args(material(), 1.0, sealer), [1], [])
    with pytest.raises(RuntimeError):
        batch.apply(torch.zeros(2, V))


def test_malformed_entries_are_refused_on_add(sealer):
    extra = watermark_extra_args(material(), 1.0, sealer)
    extra["_wm"]["w"] = 2
    with pytest.raises(ValueError):
        BatchWatermarker(sealer).add(0, extra, [], [])


def test_a_resumed_request_skips_the_contexts_it_already_used(sealer):
    """After preemption vLLM re-adds the request with its output so far: repeats stay skipped."""
    key = material("kgw-lefthash")
    extra = watermark_extra_args(key, 1.0, sealer)
    out = [10, 11, 12]
    resumed = BatchWatermarker(sealer)
    resumed.add(0, extra, out, [10])  # contexts (10,), (10,) again, (11,) were used before preemption
    logits = torch.zeros(1, V)
    resumed.apply(logits)  # context (12,) is new: marked
    assert (logits != 0).any()
    out.append(11)
    logits = torch.zeros(1, V)
    resumed.apply(logits)  # context (11,) was used before the preemption: untouched
    assert torch.equal(logits, torch.zeros(1, V))


@pytest.mark.parametrize("prompt", [[], [7], [7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
def test_short_prompts_give_the_whole_history_as_context(sealer, prompt):
    key = material()  # selfhash, width 4
    out: list[int] = []
    batch = BatchWatermarker(sealer)
    batch.add(0, watermark_extra_args(key, 1.0, sealer), out, prompt)
    for sampled in (21, 22, 23, 24, 25):
        logits = torch.randn(1, V)
        before = logits.clone()
        batch.apply(logits)
        assert torch.equal(logits[0], _expected(key, [*prompt, *out][-4:], before[0]))
        out.append(sampled)
