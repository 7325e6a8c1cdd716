"""The vLLM adapter without an engine: validation at admission, batch updates, start-up refusals, and the
sampler hook inside vLLM's own `Sampler` (penalties, temperature, top-p), including the distortion test."""

from __future__ import annotations

import math
import os
import pickle
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from scipy import stats  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessors, MoveDirectionality  # noqa: E402
from vllm.v1.sample.metadata import SamplingMetadata  # noqa: E402
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p  # noqa: E402
from vllm.v1.sample.sampler import Sampler  # noqa: E402

from kernels import watermark_cpu  # noqa: E402
from kernels.watermark import sample_gumbel  # noqa: E402
from kernels.watermark_params import RowParams, Scheme, WatermarkBatch  # noqa: E402
from server.watermark import vllm_adapter  # noqa: E402
from server.watermark.request import watermark_extra_args  # noqa: E402
from server.watermark.transport import ENV_VAR, TransportKeyMissing, current_sealer  # noqa: E402
from tests.watermark.conftest import material  # noqa: E402

V = 300
CONFIG = SimpleNamespace(speculative_config=None)


@pytest.fixture
def processor_class(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    ext = vllm_adapter.vllm_watermark()
    assert ext.logits_processors == (vllm_adapter.WatermarkLogitsProcessor,)
    assert ext.worker_extension_cls == "server.watermark.vllm_adapter.WatermarkWorkerExtension"
    return vllm_adapter.WatermarkLogitsProcessor


@pytest.fixture
def hooked_sampler(monkeypatch):
    """vLLM's own Sampler with the hook installed, as the worker extension does in an engine."""
    monkeypatch.setattr(vllm_adapter.CHANNEL, "installed", False)
    runner = SimpleNamespace(sampler=Sampler())
    assert vllm_adapter.install_sampler(runner)["installed"] is True
    assert vllm_adapter.install_sampler(runner)["installed"] is True  # idempotent: one wrapper, not two
    return runner.sampler


def test_validate_params_refuses_malformed_or_mismatched_entries(processor_class):
    key = material()
    processor_class.validate_params(SamplingParams(temperature=0.7, extra_args=watermark_extra_args(key, 0.7)))
    processor_class.validate_params(SamplingParams(temperature=0.7))  # exempt requests carry none
    with pytest.raises(ValueError):
        processor_class.validate_params(SamplingParams(temperature=0.2, extra_args=watermark_extra_args(key, 0.7)))
    forged = watermark_extra_args(key, 0.7)
    forged["_wm"]["d"] = 0.01
    with pytest.raises(ValueError):
        processor_class.validate_params(SamplingParams(temperature=0.7, extra_args=forged))
    with pytest.raises(ValueError):
        processor_class.validate_params(SamplingParams(temperature=0.7, extra_args={"_wm": {"s": 2}}))


def test_batch_updates_reach_the_watermarker(processor_class):
    proc = processor_class(CONFIG, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False
    params = SamplingParams(temperature=1.0, extra_args=watermark_extra_args(material(), 1.0, current_sealer()))
    output = [11, 12, 13, 14]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(1, params, [1, 2], output)], moved=[]))

    def marked() -> list[bool]:
        logits = torch.zeros(2, V)
        assert proc.apply(logits) is logits
        return [bool((row != 0).any()) for row in logits]

    assert marked() == [False, True]
    proc.update_state(None)
    output.append(15)
    assert marked() == [False, True]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[], moved=[(1, 0, MoveDirectionality.SWAP)]))
    assert marked() == [True, False]
    proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[], moved=[]))
    assert marked() == [False, False]


def test_refuses_speculative_decoding_and_a_missing_transport_key(processor_class, monkeypatch):
    with pytest.raises(ValueError, match="speculative"):
        processor_class(SimpleNamespace(speculative_config=object()), torch.device("cpu"), False)
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(TransportKeyMissing):
        processor_class(CONFIG, torch.device("cpu"), False)


def test_the_class_pickles_by_reference(processor_class):
    assert pickle.loads(pickle.dumps(processor_class)) is processor_class
    assert processor_class.__module__ == "server.watermark.vllm_adapter"


def test_a_cpu_engine_compiles_the_fused_path_and_its_steps_use_it(processor_class, monkeypatch):
    proc = processor_class(CONFIG, torch.device("cpu"), False)  # compiles the fused path (once per process)
    assert watermark_cpu.ready(), watermark_cpu._compiled().error
    fused_calls = []
    real = watermark_cpu.apply_kgw
    monkeypatch.setattr(watermark_cpu, "apply_kgw", lambda *a: fused_calls.append(1) or real(*a))
    params = SamplingParams(temperature=1.0, extra_args=watermark_extra_args(material(), 1.0, current_sealer()))
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(1, params, [1, 2], [7, 8, 9, 10])], moved=[]))
    with torch.inference_mode():  # as vLLM runs its sampler
        logits = torch.zeros(2, V)
        proc.apply(logits)
    assert fused_calls == [1] and (logits[1] != 0).any() and not (logits[0] != 0).any()


def test_install_refuses_processed_logprobs_and_after_start_needs_every_worker():
    with pytest.raises(ValueError, match="logprobs_mode"):
        vllm_adapter.install_sampler(SimpleNamespace(sampler=Sampler(logprobs_mode="processed_logprobs")))

    class Llm:
        def __init__(self, replies):
            self.replies = replies

        async def collective_rpc(self, method):
            assert method == vllm_adapter.INSTALL_RPC
            return self.replies

    import asyncio

    ext = vllm_adapter.VllmWatermark(())
    asyncio.run(ext.after_start(Llm([{"installed": True}, {"installed": True}])))
    for replies in ([], [{"installed": True}, {"installed": False}], [None]):
        with pytest.raises(RuntimeError, match="sampler hook"):
            asyncio.run(ext.after_start(Llm(replies)))


def _metadata(proc, temperature, top_p, presence, outputs, prompt, generators=None, vocab=V) -> SamplingMetadata:
    n = len(temperature)
    temps = torch.tensor(temperature, dtype=torch.float32)
    greedy = [t < 1e-5 for t in temperature]
    pad = [row + [vocab] * (max(map(len, prompt)) - len(row)) for row in prompt]
    return SamplingMetadata(
        temperature=temps,
        all_greedy=all(greedy),
        all_random=not any(greedy),
        top_p=torch.tensor(top_p, dtype=torch.float32) if any(p < 1 for p in top_p) else None,
        top_k=None,
        generators=generators or {},
        max_num_logprobs=None,
        no_penalties=not any(presence),
        prompt_token_ids=torch.tensor(pad, dtype=torch.int64),
        frequency_penalties=torch.zeros(n),
        presence_penalties=torch.tensor(presence, dtype=torch.float32),
        repetition_penalties=torch.ones(n),
        output_token_ids=outputs,
        allowed_token_ids_mask=None,
        bad_words_token_ids={},
        logitsprocs=LogitsProcessors([proc]),
    )


def test_sampled_rows_are_chosen_by_the_key_after_penalties_temperature_and_top_p(processor_class, hooked_sampler):
    """A sampled row's token is the keyed Gumbel choice over exactly the distribution vLLM would sample."""
    proc = processor_class(CONFIG, torch.device("cpu"), False)
    key = material("auto")
    sealer = current_sealer()
    outputs = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    added = [
        (
            0,
            SamplingParams(temperature=0.7, top_p=0.8, extra_args=watermark_extra_args(key, 0.7, sealer)),
            [1],
            outputs[0],
        ),
        (1, SamplingParams(temperature=0.9), [1], outputs[1]),  # exempt: vLLM samples it
        (2, SamplingParams(temperature=0.0, extra_args=watermark_extra_args(key, 0.0, sealer)), [1], outputs[2]),
    ]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3)) * 2
    md = _metadata(proc, [0.7, 0.9, 0.0], [0.8, 1.0, 1.0], [0.5, 0.0, 0.0], outputs, [[1], [1], [1]])
    with torch.inference_mode():
        out = hooked_sampler(logits.clone(), md).sampled_token_ids[:, 0]

    # What vLLM does to row 0 before sampling: presence penalty on tokens seen, temperature, top-p.
    expected = logits[:1].clone()
    expected[0, outputs[0]] -= 0.5  # presence counts output tokens
    filtered = apply_top_k_top_p(expected / 0.7, None, torch.tensor([0.8]))
    row = RowParams(Scheme.GUMBEL, key=key.key, context=outputs[0], temperature=1.0)
    assert int(out[0]) == int(sample_gumbel(filtered, WatermarkBatch.build([row]))[0])
    assert math.isfinite(float(filtered[0, int(out[0])]))  # inside the top-p nucleus
    assert 0 <= int(out[1]) < V
    assert int(out[2]) == int(_gated_argmax(logits[2:3], key, outputs[2]))


def _gated_argmax(logits, key, context) -> int:
    from kernels.watermark import apply_watermark

    x = logits.clone()
    apply_watermark(
        x, WatermarkBatch.build([RowParams(Scheme.KGW_SELFHASH, key=key.key, context=context, gate=key.gate)])
    )
    return int(x.argmax())


def test_without_marked_rows_the_hook_is_vllms_own_sampling(hooked_sampler, processor_class):
    proc = processor_class(CONFIG, torch.device("cpu"), False)
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    seeded = {0: torch.Generator().manual_seed(7)}
    md = _metadata(proc, [1.0, 1.0], [0.9, 0.9], [0.0, 0.0], [[], []], [[1], [1]], seeded)
    with torch.inference_mode():
        hooked = hooked_sampler(logits.clone(), md).sampled_token_ids[:, 0]
        plain = Sampler()(
            logits.clone(),
            _metadata(
                proc, [1.0, 1.0], [0.9, 0.9], [0.0, 0.0], [[], []], [[1], [1]], {0: torch.Generator().manual_seed(7)}
            ),
        ).sampled_token_ids[:, 0]
    assert int(hooked[0]) == int(plain[0])  # the seeded row: vLLM's generator, untouched


def test_distortion_free_over_keys_with_top_p_and_a_presence_penalty(processor_class, hooked_sampler):
    """Over many keys, the watermarked token frequencies equal vLLM's processed distribution (chi-square)."""
    proc = processor_class(CONFIG, torch.device("cpu"), False)
    sealer = current_sealer()
    vocab, draws, temperature, top_p, presence = 40, 6000, 0.8, 0.9, 0.7
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(11)) * 1.5
    context = [3, 4, 5, 6]
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[context] = True
    target = apply_top_k_top_p((logits - presence * seen) / temperature, None, torch.tensor([top_p])).softmax(-1)[0]
    counts = torch.zeros(vocab)
    batch = 200
    for start in range(0, draws, batch):
        added = []
        for i in range(batch):
            key = material("auto", key_id=f"wk_{start + i:012x}", key=os.urandom(16))
            params = SamplingParams(
                temperature=temperature, top_p=top_p, extra_args=watermark_extra_args(key, temperature, sealer)
            )
            added.append((i, params, [1], list(context)))
        proc.update_state(
            BatchUpdate(batch_size=batch, removed=list(range(batch)) if start else [], added=added, moved=[])
        )
        md = _metadata(
            proc,
            [temperature] * batch,
            [top_p] * batch,
            [presence] * batch,
            [list(context)] * batch,
            [[1]] * batch,
            vocab=vocab,
        )
        with torch.inference_mode():
            out = hooked_sampler(logits.expand(batch, vocab).clone(), md).sampled_token_ids[:, 0]
        counts += torch.bincount(out, minlength=vocab).float()
    support = target > 0
    assert counts[~support].sum() == 0  # never outside the nucleus
    expected = target[support] * draws
    chi2, p = stats.chisquare(counts[support].numpy(), expected.numpy())
    assert p > 1e-3, (chi2, p)
