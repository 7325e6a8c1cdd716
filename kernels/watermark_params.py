"""Per-row watermark parameters, packed so that one kernel launch serves a mixed batch.

The server (never the client) sets one `RowParams` per request; per decode step the logits
processor packs `row.step_row(history, skip=tracker.is_repeat(history, len(history)))` for each
request into a `WatermarkBatch` (`WatermarkBatch.pack`) and hands it to
`kernels.watermark.apply_watermark`. Everything a row needs travels in one int32 row of
`WatermarkBatch.table` (floats and uint32 as bit patterns), so a step costs one small host-to-device
copy however mixed the batch is. On CUDA that copy comes from pinned memory and does not block the host
(a pageable copy would wait for the model's forward pass to finish, stalling vLLM's asynchronous
scheduling every step). Host cost: about 0.5 ms of Python per step for 256 watermarked rows.
"""

from __future__ import annotations

import array
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from kernels.watermark_hash import gamma_threshold, key_words


class Scheme(IntEnum):
    """Watermark scheme of a row; the number is also hashed into the row's seed."""

    OFF = 0
    KGW_LEFTHASH = 1
    KGW_SELFHASH = 2
    GUMBEL = 3


# Column layout of WatermarkBatch.table (int32). Mirrored by the Triton kernel.
COL_SCHEME = 0
COL_SKIP = 1
COL_CTX_LEN = 2
COL_THRESHOLD = 3  # uint32 bit pattern
COL_KEY = 4  # 4 words, uint32 bit patterns
COL_DELTA = 8  # float32 bit pattern
COL_TEMPERATURE = 9  # float32 bit pattern
COL_CONTEXT = 10  # W_MAX tokens, oldest first, valid ones first
W_MAX = 8
COL_GATE = COL_CONTEXT + W_MAX  # float32 bit pattern; KGW rows: 0.0 ungated, else the confidence gate
N_COLS = COL_GATE + 1

DEFAULT_WIDTH = {Scheme.KGW_LEFTHASH: 1, Scheme.KGW_SELFHASH: 4, Scheme.GUMBEL: 4}


def _i32(u: int) -> int:
    """A uint32 as the int32 with the same bits."""
    return u - (1 << 32) if u >= 1 << 31 else u


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


@dataclass(frozen=True)
class RowParams:
    """One request's watermark for one decode step.

    `context` is the token history (prompt + output so far, or at least its last `width` tokens);
    only the last `width` are used. `skip` marks a context already seen in this response (see
    `ContextTracker`): such a row is left untouched, exactly like `Scheme.OFF`.
    `temperature` is the row's sampling temperature; only Gumbel uses it (divides the logits by it).
    `gate` (KGW only; 0 means ungated) makes the row *confidence-gated*: it is left untouched where the
    model's top probability, softmax(logits).max(), is at least `gate`, and elsewhere only the logits
    within `delta` of the row's maximum are candidates for the bias (the only ones a greedy choice can
    move to), see `kernels.watermark`. Validated once at construction; per decode step, `step_row` packs
    another context without building a new object.
    """

    scheme: Scheme
    key: bytes = field(repr=False)  # a secret: never in reprs, logs or tracebacks
    context: Sequence[int] = field(default=(), repr=False)
    width: int = 0  # 0: the scheme's default (lefthash 1, selfhash 4, gumbel 4)
    gamma: float = 0.25
    delta: float = 2.0
    temperature: float = 1.0
    skip: bool = False
    gate: float = 0.0
    _code: int = field(init=False, repr=False, compare=False)  # column 0 (int(scheme), without enum lookups)
    _static: tuple[int, ...] = field(init=False, repr=False, compare=False)  # columns 3..9
    _gate_bits: int = field(init=False, repr=False, compare=False)  # column COL_GATE

    def __post_init__(self) -> None:
        scheme = Scheme(self.scheme)
        object.__setattr__(self, "scheme", scheme)
        if self.width == 0 and scheme is not Scheme.OFF:
            object.__setattr__(self, "width", DEFAULT_WIDTH[scheme])
        if scheme is not Scheme.OFF and not 1 <= self.width <= W_MAX:
            raise ValueError(f"context width must be 1..{W_MAX}")
        if not math.isfinite(self.delta):
            raise ValueError("delta must be finite")
        if scheme is Scheme.GUMBEL and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError("Gumbel watermarking needs a finite temperature > 0")
        if not (0.0 <= self.gate <= 1.0) or (self.gate and scheme not in (Scheme.KGW_LEFTHASH, Scheme.KGW_SELFHASH)):
            raise ValueError("a confidence gate lies in [0, 1] and applies to KGW rows only")
        static = (
            _i32(gamma_threshold(self.gamma)),
            *(_i32(w) for w in key_words(self.key)),
            _f32_bits(self.delta),
            _f32_bits(self.temperature),
        )
        object.__setattr__(self, "_code", int(scheme))
        object.__setattr__(self, "_static", static)
        object.__setattr__(self, "_gate_bits", _f32_bits(self.gate))
        self.table_row()  # validates the context

    def table_row(self) -> list[int]:
        return self.step_row(self.context, self.skip)

    def step_row(self, context: Sequence[int], skip: bool = False) -> list[int]:
        """This row's table row with another context (its last `width` tokens) and skip flag. Token ids
        must lie in [0, 2**31): checked here, and again by the int32 packing."""
        ctx = context[-self.width :] if self._code else ()
        if ctx and (min(ctx) < 0 or max(ctx) >= 1 << 31):
            raise ValueError("token ids must lie in [0, 2**31)")
        return [self._code, int(skip), len(ctx), *self._static, *ctx, *_PAD[len(ctx) :], self._gate_bits]


_OFF_ROW = [0] * N_COLS
_PAD = [0] * W_MAX


@dataclass(frozen=True, eq=False)
class WatermarkBatch:
    """Packed parameters of every row in a logits batch (row i of the table is logits row i).

    `has_gumbel`, `any_active` and `has_gated` are known on the host, so the launcher decides how many
    launches to issue (0, 1 or 2) and whether to compute row maxima without a device sync.
    """

    table: torch.Tensor  # int32 [B, N_COLS]
    has_gumbel: bool
    any_active: bool
    has_gated: bool = False

    @classmethod
    def build(
        cls, rows: Sequence[RowParams | None], device: torch.device | str = "cpu", *, pin_memory: bool = False
    ) -> WatermarkBatch:
        """Pack `rows` (None means not watermarked) for `device`."""
        return cls.pack([row.table_row() if row is not None else None for row in rows], device, pin_memory=pin_memory)

    @classmethod
    def pack(
        cls, rows: Sequence[Sequence[int] | None], device: torch.device | str = "cpu", *, pin_memory: bool = False
    ) -> WatermarkBatch:
        """Pack table rows (`RowParams.step_row`; None: not watermarked) for `device`.

        `pin_memory` (CUDA hosts): the table is staged in pinned host memory and copied without blocking
        the host; torch's pinned-memory cache keeps the staging buffer until the copy has run.
        """
        flat = array.array("i")  # C int: 32 bits on every platform torch supports; larger ids raise
        any_active = has_gumbel = has_gated = False
        for row in rows:
            if row is None:
                flat.extend(_OFF_ROW)
                continue
            if len(row) != N_COLS:
                raise ValueError(f"table rows must hold {N_COLS} columns")
            flat.extend(row)
            if row[COL_SCHEME] != Scheme.OFF and not row[COL_SKIP]:
                any_active = True
                has_gumbel = has_gumbel or row[COL_SCHEME] == Scheme.GUMBEL
                has_gated = has_gated or row[COL_GATE] != 0
        table = torch.empty((len(rows), N_COLS), dtype=torch.int32, pin_memory=pin_memory)
        if rows:
            table.copy_(torch.frombuffer(flat, dtype=torch.int32).reshape(len(rows), N_COLS))
        return cls(table.to(device, non_blocking=pin_memory), has_gumbel, any_active, has_gated)

    def __len__(self) -> int:
        return self.table.shape[0]

    def to(self, device: torch.device | str) -> WatermarkBatch:
        return WatermarkBatch(self.table.to(device), self.has_gumbel, self.any_active, self.has_gated)

    # Decoded views for the torch path: hash inputs stay int32 bit patterns (see watermark_hash).
    def effective_scheme(self) -> torch.Tensor:
        return torch.where(self.table[:, COL_SKIP] != 0, 0, self.table[:, COL_SCHEME])

    def key(self) -> torch.Tensor:
        return self.table[:, COL_KEY : COL_KEY + 4]

    def context(self) -> torch.Tensor:
        return self.table[:, COL_CONTEXT:]

    def ctx_len(self) -> torch.Tensor:
        return self.table[:, COL_CTX_LEN]

    def threshold(self) -> torch.Tensor:
        return self.table[:, COL_THRESHOLD]

    def delta(self) -> torch.Tensor:
        return self.table[:, COL_DELTA].contiguous().view(torch.float32)

    def temperature(self) -> torch.Tensor:
        return self.table[:, COL_TEMPERATURE].contiguous().view(torch.float32)

    def gate(self) -> torch.Tensor:
        return self.table[:, COL_GATE].contiguous().view(torch.float32)


class ContextTracker:
    """Per-request record of the contexts already watermarked in this response.

    A context (the last `width` tokens) that repeats is not watermarked again: repeated n-grams
    bias text towards loops and inflate false positives, and the detector scores each once. The
    first position at which a context occurred is kept, so asking again for the same position
    (a recomputed or replayed step) gives the same answer.
    """

    def __init__(self, width: int) -> None:
        if not 1 <= width <= W_MAX:
            raise ValueError(f"context width must be 1..{W_MAX}")
        self.width = width
        self._first_seen: dict[tuple[int, ...], int] = {}

    def is_repeat(self, context: Sequence[int], position: int) -> bool:
        """True iff the context ending before `position` already occurred earlier in the response."""
        window = tuple(context[-self.width :])
        first = self._first_seen.setdefault(window, position)
        return first < position

    def __len__(self) -> int:
        return len(self._first_seen)
