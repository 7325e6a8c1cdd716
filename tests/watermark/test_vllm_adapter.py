"""The vLLM adapter without an engine: validation at admission, batch updates, start-up refusals."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from kernels import watermark_cpu  # noqa: E402
from server.engine import vllm_engine  # noqa: E402
from server.watermark.request import watermark_extra_args  # noqa: E402
from server.watermark.transport import ENV_VAR, TransportKeyMissing, current_sealer  # noqa: E402
from tests.watermark.conftest import material  # noqa: E402

V = 300
CONFIG = SimpleNamespace(speculative_config=None)


@pytest.fixture
def processor_class(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert vllm_engine.watermark_processors() == [vllm_engine.WatermarkLogitsProcessor]
    return vllm_engine.WatermarkLogitsProcessor


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
    assert processor_class.__module__ == "server.engine.vllm_engine"


def test_a_cpu_engine_compiles_the_fused_path_and_its_steps_use_it(processor_class, monkeypatch):
    proc = processor_class(CONFIG, torch.device("cpu"), False)  # compiles the fused path (once per process)
    assert watermark_cpu.ready(), watermark_cpu._compiled().error
    fused_calls = []
    real = watermark_cpu.apply_kgw
    monkeypatch.setattr(watermark_cpu, "apply_kgw", lambda *a: fused_calls.append(1) or real(*a))
    params = SamplingParams(temperature=1.0, extra_args=watermark_extra_args(material(), 1.0, current_sealer()))
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(1, params, [1, 2], [7, 8])], moved=[]))
    with torch.inference_mode():  # as vLLM runs its sampler
        logits = torch.zeros(2, V)
        proc.apply(logits)
    assert fused_calls == [1] and (logits[1] != 0).any() and not (logits[0] != 0).any()
