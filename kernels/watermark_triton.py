"""Triton kernels of the watermark logits operation; `kernels.watermark.apply_watermark_reference` is
the plain-torch function they must equal. Import only where Triton is installed (CUDA hosts, or the
interpreter with TRITON_INTERPRET=1 set before this import).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, cast

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from kernels import watermark_hash as H
from kernels import watermark_params as P
from kernels.watermark_gate import gate_floor


def _jit_shared(leaf: Callable[..., Any]) -> Any:
    """`triton.jit` of a hash leaf from watermark_hash, which must not import Triton. The interpreter
    looks for triton.language among a jit function's globals, so jit a copy whose globals have it."""
    fn = cast(types.FunctionType, leaf)
    clone = types.FunctionType(fn.__code__, {**fn.__globals__, "tl": tl}, fn.__name__, fn.__defaults__)
    clone.__qualname__, clone.__doc__, clone.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return triton.jit(clone)


# The hash leaves, shared verbatim with the torch path (see watermark_hash's module docstring).
_fmix32 = _jit_shared(H.fmix32)
_murmur3_round = _jit_shared(H.murmur3_round)
_token_mix = _jit_shared(H.token_mix)

_N_COLS = tl.constexpr(P.N_COLS)
_W_MAX = tl.constexpr(P.W_MAX)
_COL_SCHEME = tl.constexpr(P.COL_SCHEME)
_COL_SKIP = tl.constexpr(P.COL_SKIP)
_COL_CTX_LEN = tl.constexpr(P.COL_CTX_LEN)
_COL_THRESHOLD = tl.constexpr(P.COL_THRESHOLD)
_COL_KEY = tl.constexpr(P.COL_KEY)
_COL_DELTA = tl.constexpr(P.COL_DELTA)
_COL_TEMPERATURE = tl.constexpr(P.COL_TEMPERATURE)
_COL_CONTEXT = tl.constexpr(P.COL_CONTEXT)
_COL_GATE = tl.constexpr(P.COL_GATE)
_SELFHASH = tl.constexpr(int(P.Scheme.KGW_SELFHASH))
_GUMBEL = tl.constexpr(int(P.Scheme.GUMBEL))


@triton.jit
def _u32_at(ptr):
    return tl.load(ptr).to(tl.uint32, bitcast=True)


@triton.jit
def _key_tag_state(params, tag):
    """MurmurHash3 state after the words k0, k1, k2, k3, tag (not yet finalized)."""
    h = tl.full((), 0, tl.uint32)
    for j in tl.static_range(4):
        h = _murmur3_round(h, _u32_at(params + _COL_KEY + j))
    return _murmur3_round(h, tag.to(tl.uint32))


@triton.jit
def _row_seed(params, tag, n_ctx):
    """murmur3(k0..k3, tag, ctx_1..ctx_n): the lefthash / Gumbel seed of one row."""
    h = _key_tag_state(params, tag)
    for i in tl.static_range(_W_MAX):
        h = tl.where(i < n_ctx, _murmur3_round(h, _u32_at(params + _COL_CONTEXT + i)), h)
    return _fmix32(h ^ ((n_ctx + 5) * 4).to(tl.uint32))


@triton.jit
def _round_to_bf16(x):
    """fp32 -> bf16, round to nearest even, in integers: what cvt.rn.bf16.f32 and torch do for
    non-NaN values, spelled out because the interpreter's float casts truncate instead."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


# One program = one (row, block of BLOCK token ids). It reads the row's parameters (a few scalars);
# rows that are OFF or skipped stop there and never touch their logits. Otherwise, per token id v:
#   lefthash / gumbel  value(v) = fmix32(seed ^ mix(v)), seed = murmur3(key, scheme, context)
#   selfhash           value(v) = fmix32(min(h(ctx_1..ctx_n), h(v)) ^ mix(v)), h(t) = fmix32(kh ^ mix(t))
#   KGW                store fp32(x) + delta, rounded once to the logits dtype, where value(v) < threshold
#                      (masked store: red and NaN logits are read once and not written)
#   KGW, gated         (gate > 0) the row's `open` flag and `floor` = fl(max - delta) come from the launcher
#                      (`kernels.watermark.gate_floor`, torch on the device, no host sync): a closed row
#                      stops at once; an open one stores only where also fp32(x) >= floor
#   Gumbel             s(v) = x * fl(1/T) - log(-log(u)), u = (2 * (value >> 9) + 1) * 2**-24, NaN as -inf;
#                      store -inf everywhere except the block's first argmax, and leave
#                      (s_max, argmax) in `cand` for _gumbel_finalize_kernel (grid-wide argmax).
# Every logit is read once and written at most once. FP fusion is disabled at launch so that the
# multiply and subtract round separately, exactly as torch's ops do (no FMA contraction).
@triton.jit
def _watermark_kernel(
    logits_ptr, stride_row, table_ptr, cand_ptr, open_ptr, floor_ptr, vocab, n_blocks,
    BLOCK: tl.constexpr, LOGITS_BF16: tl.constexpr, HAS_GATED: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    blk = tl.program_id(1)
    params = table_ptr + row * _N_COLS
    scheme = tl.load(params + _COL_SCHEME)
    skip = tl.load(params + _COL_SKIP)
    gated = False
    if HAS_GATED:
        gated = tl.load(params + _COL_GATE) != 0
        if gated:
            skip = skip | (tl.load(open_ptr + row) == 0)
    if (scheme != 0) & (skip == 0):
        n_ctx = tl.load(params + _COL_CTX_LEN)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < vocab
        mixed = _token_mix(offs.to(tl.uint32))
        if scheme == _SELFHASH:
            kh = _fmix32(_key_tag_state(params, scheme) ^ 20)
            window_min = tl.full((), 0xFFFFFFFF, tl.uint32)
            for i in tl.static_range(_W_MAX):
                h_ctx = _fmix32(kh ^ _token_mix(_u32_at(params + _COL_CONTEXT + i)))
                window_min = tl.where(i < n_ctx, tl.minimum(window_min, h_ctx), window_min)
            own = _fmix32(kh ^ mixed)
            value = _fmix32(tl.minimum(own, window_min) ^ mixed)
        else:
            value = _fmix32(_row_seed(params, scheme, n_ctx) ^ mixed)

        ptrs = logits_ptr + row.to(tl.int64) * stride_row + offs
        x = tl.load(ptrs, mask=in_range, other=float("-inf"))
        if scheme == _GUMBEL:
            temperature = tl.load(params + _COL_TEMPERATURE).to(tl.float32, bitcast=True)
            inv_t = tl.div_rn(tl.full((), 1.0, tl.float32), temperature)  # IEEE, as torch's 1 / T
            u = ((value >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
            score = x.to(tl.float32) * inv_t - tl.log(-tl.log(u))
            score = tl.where(in_range & (score == score), score, float("-inf"))  # NaN never wins
            best, best_at = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            winner = blk * BLOCK + best_at
            neg_inf = tl.full([BLOCK], float("-inf"), x.dtype)
            tl.store(ptrs, neg_inf, mask=in_range & (offs != winner))
            cand = cand_ptr + (row * n_blocks + blk) * 2
            tl.store(cand, best.to(tl.int32, bitcast=True))
            tl.store(cand + 1, winner)
        else:
            threshold = _u32_at(params + _COL_THRESHOLD)
            delta = tl.load(params + _COL_DELTA).to(tl.float32, bitcast=True)
            bumped = x.to(tl.float32) + delta
            write = in_range & (value < threshold) & (x == x)
            if HAS_GATED:  # noqa: SIM102 - a compile-time branch around a run-time one
                if gated:
                    write = write & (x.to(tl.float32) >= tl.load(floor_ptr + row))
            if LOGITS_BF16:
                bumped = _round_to_bf16(bumped)
            tl.store(ptrs, bumped, mask=write)


# One program per row. Gumbel rows (not skipped) hold one finite logit per block after the main
# kernel; this keeps the block winner with the highest score (first block on ties, which is the
# lowest token id, as torch.argmax) and writes -inf over the others: n_blocks - 1 stores per row.
@triton.jit
def _gumbel_finalize_kernel(logits_ptr, stride_row, table_ptr, cand_ptr, n_blocks, NB: tl.constexpr):
    row = tl.program_id(0)
    params = table_ptr + row * _N_COLS
    scheme = tl.load(params + _COL_SCHEME)
    skip = tl.load(params + _COL_SKIP)
    if (scheme == _GUMBEL) & (skip == 0):
        j = tl.arange(0, NB)
        valid = j < n_blocks
        cand = cand_ptr + (row * n_blocks + j) * 2
        score = tl.load(cand, mask=valid, other=0).to(tl.float32, bitcast=True)
        score = tl.where(valid, score, float("-inf"))
        index = tl.load(cand + 1, mask=valid, other=0)
        _, best_j = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        neg_inf = tl.full([NB], float("-inf"), logits_ptr.dtype.element_ty)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        tl.store(row_ptr + index, neg_inf, mask=valid & (j != best_j))


def launch_config(n_rows: int, vocab: int) -> tuple[int, int]:
    """(BLOCK, num_warps). Large blocks amortize the per-program row hashing; small batches use
    smaller blocks so that enough programs exist to fill the GPU. Not yet tuned on hardware."""
    if n_rows * triton.cdiv(vocab, 4096) >= 256:
        return 4096, 8
    return 1024, 4


def apply_watermark_triton(
    logits: torch.Tensor, batch: P.WatermarkBatch, *, config: tuple[int, int] | None = None
) -> None:
    """In-place watermark of `logits` [B, V]: one launch, plus a tiny second one if a row is Gumbel.
    `config` overrides `launch_config` (tests and benchmarks)."""
    if not batch.any_active:
        return
    n_rows, vocab = logits.shape
    if logits.stride(1) != 1 or logits.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("logits must be fp32 or bf16 with contiguous rows")
    block, num_warps = config or launch_config(n_rows, vocab)
    n_blocks = triton.cdiv(vocab, block)
    table = batch.table.to(logits.device, non_blocking=True)
    # Per-block Gumbel winners (score bits, index); without Gumbel rows nothing writes it.
    cand = table
    if batch.has_gumbel:
        cand = torch.empty((n_rows, n_blocks, 2), dtype=torch.int32, device=logits.device)
    is_open, floor = table, table  # unused placeholders unless a row is gated
    if batch.has_gated:
        floor, opened = gate_floor(
            logits,
            table[:, P.COL_DELTA].contiguous().view(torch.float32),
            table[:, P.COL_GATE].contiguous().view(torch.float32),
        )
        is_open = opened.to(torch.int32)
    _watermark_kernel[(n_rows, n_blocks)](
        logits, logits.stride(0), table, cand, is_open, floor, vocab, n_blocks,
        BLOCK=block, LOGITS_BF16=logits.dtype == torch.bfloat16, HAS_GATED=batch.has_gated,
        num_warps=num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    if batch.has_gumbel:
        _gumbel_finalize_kernel[(n_rows,)](
            logits, logits.stride(0), table, cand, n_blocks,
            NB=triton.next_power_of_2(n_blocks), num_warps=1, enable_fp_fusion=False,
        )  # fmt: skip
