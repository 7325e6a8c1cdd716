"""The watermark inside vLLM 0.32's V1 model runner: a batch logits processor and a sampler hook.

`vllm_watermark()` gives `VllmEngine` what every engine the server builds carries:

  * `WatermarkLogitsProcessor`, a V1 batch `LogitsProcessor` that forwards batch updates to
    `server.watermark.processor.BatchWatermarker`. It runs after the grammar bitmask, allowed-token mask,
    bad words and the built-in min-tokens / logit-bias processors, and before penalties, temperature,
    min-p and top-k/top-p. There it applies the KGW rows (kgw-gated for greedy requests).
  * A sampler hook for sampled requests (Gumbel rows): vLLM applies penalties, temperature, min-p, top-k
    and top-p, then calls its `TopKTopPSampler`. `install_sampler` wraps that module's `forward` on the
    engine's own `Sampler` instance (nothing else in the process changes): for the rows the processor
    offered this step it filters exactly as vLLM would (`apply_top_k_top_p`, vLLM's own function) and
    chooses the token by Gumbel-max with the keyed uniforms (`kernels.watermark.sample_gumbel`), an exact
    sample of the distribution the request asked for; every other row goes to vLLM's own sampling
    unchanged. The hook is installed in each worker process through vLLM's `worker_extension_cls` and a
    `collective_rpc` right after the engine starts, before it can see a request; the engine refuses to
    start if any worker does not confirm, and a Gumbel row reaching an engine without it raises (fail
    closed) instead of going out unmarked.

Both classes are defined on first use (vLLM is imported lazily everywhere in the server) and published as
module attributes (PEP 562 `__getattr__` for the processor), so vLLM's spawned engine processes find them
by name.

What guarantees real (non-placeholder) output token ids, in vLLM 0.32's V1 model runner (the CPU runner
subclasses it):
  1. `GPUModelRunner.__init__` builds its `InputBatch` with
     `logitsprocs_need_output_token_ids=bool(custom_logitsprocs)`: registering any custom processor makes
     `InputBatch._make_sampling_metadata` keep `sampling_metadata.output_token_ids`, the per-request output
     lists, which are the very list objects `BatchUpdate.added` hands us (`req_output_token_ids`).
  2. Under asynchronous scheduling those lists end in -1 placeholders for tokens still being copied from
     the device. Because the lists are needed, `set_async_sampled_token_ids` keeps the host copy of the
     sampled ids, and `GPUModelRunner._sample` calls `input_batch.update_async_output_token_ids()` (which
     waits on the copy event and overwrites the placeholders in place) *before* the sampler runs.
  3. So we read the lists in `apply()`, inside the sampler, never in `update_state()` (which runs before
     the repair). Should a placeholder still appear, `BatchWatermarker` hashes nothing for that row and
     step and counts it (`placeholder_steps`).
`is_argmax_invariant()` is False, so vLLM also applies the processor to greedy requests.
Not covered, and refused rather than serving unmarked text:
  * speculative decoding: V1 applies only built-in processors to draft positions; vLLM's
    `build_logitsprocs` already refuses custom processors with it, and the processor refuses it again;
  * Model Runner V2 (the default on CUDA hosts with Triton in 0.32): it loads only V2-interface processors
    and refuses this class at engine start, so CUDA pools set VLLM_USE_V2_MODEL_RUNNER=0;
  * `logprobs_mode` processed_logits / processed_logprobs: the hook does not compute them; install refuses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from server.watermark.channel import SamplerChannel

# This process's channel between the processor and the sampler hook (one model runner per process: the
# engine core process on CPU pools, each worker process of a tensor-parallel CUDA pool).
CHANNEL = SamplerChannel()
WORKER_EXTENSION = f"{__name__}.WatermarkWorkerExtension"
INSTALL_RPC = "install_watermark_sampler"


@dataclass(frozen=True)
class VllmWatermark:
    """What `VllmEngine` needs to build a watermarking engine (`server.engine.vllm_engine.EngineExtension`)."""

    logits_processors: tuple[type, ...]
    worker_extension_cls: str = WORKER_EXTENSION

    async def after_start(self, llm: Any) -> None:
        """Install the sampler hook in every worker; raise (the engine is then stopped) unless all confirm."""
        replies = await llm.collective_rpc(INSTALL_RPC)
        if not replies or not all(isinstance(r, dict) and r.get("installed") is True for r in replies):
            raise RuntimeError(f"the watermark sampler hook was not confirmed by every worker: {replies!r}")


def vllm_watermark() -> VllmWatermark:
    """The watermark extension of every engine the server builds.

    Also creates the process tree's watermark transport key (before the engine spawns its processes, so
    they inherit it; see `server.watermark.transport`).
    """
    from server.watermark.transport import install_transport_key

    install_transport_key()
    return VllmWatermark((_processor_class(),))


class WatermarkWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`) so that `collective_rpc` reaches it."""

    model_runner: Any

    def install_watermark_sampler(self) -> dict[str, Any]:
        return install_sampler(self.model_runner)


def install_sampler(runner: Any) -> dict[str, Any]:
    """Wrap `runner.sampler.topk_topp_sampler.forward` (idempotent) and open this process's channel."""
    from server.engine.vllm_engine import vllm_api

    sampler = runner.sampler
    if sampler.logprobs_mode in vllm_api().PROCESSED_LOGPROBS_MODES:
        raise ValueError(f"the watermark sampler hook does not support logprobs_mode={sampler.logprobs_mode!r}")
    module = sampler.topk_topp_sampler
    if not getattr(module, "_watermark_hook", False):
        inner = module.forward

        def forward(logits: Any, generators: dict[int, Any], k: Any, p: Any) -> tuple[Any, Any]:
            return watermarked_sample(inner, CHANNEL, logits, generators, k, p)

        module.forward = forward
        module._watermark_hook = True
    CHANNEL.installed = True
    return {"installed": True, "pid": os.getpid()}


def watermarked_sample(
    inner: Any, channel: SamplerChannel, logits: Any, generators: dict[int, Any], k: Any, p: Any
) -> tuple[Any, None]:
    """`TopKTopPSampler.forward` with this step's Gumbel rows chosen by their keys.

    `logits` arrive after penalties, temperature and min-p; top-k/top-p are applied here as vLLM's own
    forward would, then each marked row takes argmax(filtered + Gumbel(u)) and every other row is sampled by
    vLLM (`inner`, nothing left to filter) with its own generator if the request is seeded.
    """
    pending = channel.take(logits.shape[0])
    if pending is None:
        return inner(logits, generators, k, p)
    import torch

    from kernels.watermark import sample_gumbel
    from kernels.watermark_params import Scheme
    from server.engine.vllm_engine import vllm_api

    logits = vllm_api().apply_top_k_top_p(logits, k, p)
    chosen = sample_gumbel(logits, pending)
    marked = set((pending.effective_scheme() == Scheme.GUMBEL).nonzero().flatten().tolist())
    others = [i for i in range(logits.shape[0]) if i not in marked]
    if others:
        index = torch.tensor(others, dtype=torch.int64, device=logits.device)
        own = {j: generators[i] for j, i in enumerate(others) if i in generators}
        sampled, _ = inner(logits[index], own, None, None)
        chosen[index] = sampled.to(chosen.dtype)
    return chosen, None


_PROCESSOR: type | None = None


def __getattr__(name: str) -> Any:
    if name == "WatermarkLogitsProcessor":
        return _processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _processor_class() -> type:
    global _PROCESSOR
    if _PROCESSOR is None:
        _PROCESSOR = _define_processor()
    return _PROCESSOR


def _define_processor() -> type:
    from kernels.watermark_cpu import prepare as prepare_fused_cpu_path
    from server.engine.vllm_engine import vllm_api
    from server.watermark.processor import BatchWatermarker
    from server.watermark.request import parse_wm
    from server.watermark.transport import current_sealer

    vllm = vllm_api()

    class WatermarkLogitsProcessor(vllm.LogitsProcessor):  # type: ignore[name-defined]
        """Applies each request's server-set watermark (`SamplingParams.extra_args["_wm"]`) to the batch."""

        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            if getattr(vllm_config, "speculative_config", None) is not None:
                raise ValueError("watermarking does not support speculative decoding (drafts would go unmarked)")
            # No transport key: refuse (current_sealer raises).
            self._batch = BatchWatermarker(current_sealer(), pin_memory=is_pin_memory, channel=CHANNEL)
            if str(device).startswith("cpu"):
                prepare_fused_cpu_path()  # on the engine's thread, before any request (kernels/watermark_cpu.py)

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            """At admission: refuse a malformed or forged `_wm`, or one whose temperature disagrees."""
            wm = parse_wm(sampling_params.extra_args)
            if wm is not None and wm.temperature != float(sampling_params.temperature):
                raise ValueError("_wm.t does not match the request's temperature")

        def is_argmax_invariant(self) -> bool:
            return False  # a watermark changes greedy choices too

        def update_state(self, batch_update: Any) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self._batch.remove(index)
            for index, params, _prompt_ids, output_ids in batch_update.added:
                self._batch.add(index, params.extra_args, output_ids)
            for a, b, direction in batch_update.moved:
                self._batch.move(a, b, swap=direction == vllm.MoveDirectionality.SWAP)

        def apply(self, logits: Any) -> Any:
            return self._batch.apply(logits)

    WatermarkLogitsProcessor.__module__ = __name__
    WatermarkLogitsProcessor.__qualname__ = "WatermarkLogitsProcessor"
    return WatermarkLogitsProcessor
