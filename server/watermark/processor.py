"""`BatchWatermarker`: the engine-independent half of the batch logits processor (plain Python + torch).

The vLLM adapter (`server.engine.vllm_engine.WatermarkLogitsProcessor`) forwards vLLM's persistent-batch
updates here: `add` when a request takes a batch slot, `remove` when it leaves, `move` when the batch is
condensed or reordered, and `apply` once per decode step with the logits of every slot.

Per watermarked request the row keeps its validated parameters (`RowParams`), a `ContextTracker`, the
last few prompt tokens and a *live reference* to the request's output token list (vLLM appends to that
list; we never copy it). Each step the context is the last `width` tokens of prompt + output. A context
that already occurred earlier in this response is left untouched (`skip`): repeated n-grams would
otherwise push the text into loops and inflate false positives, and the detector scores each once.

Rows without `_wm` cost nothing; a batch without watermarked rows returns the logits untouched without
building anything. A placeholder token (a negative id, which vLLM's asynchronous scheduling uses for a
token still being copied back) in the context is never hashed: the row is left untouched for that step
and counted in `placeholder_steps` (the adapter declares that it needs real token ids, so this is a
guard, not a path we expect to take).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kernels.watermark import apply_watermark
from kernels.watermark_params import COL_SKIP, W_MAX, ContextTracker, RowParams, Scheme, WatermarkBatch
from server.watermark.request import WatermarkArgs, parse_wm
from server.watermark.transport import KeySealer

log = logging.getLogger(__name__)


@dataclass
class _Row:
    params: RowParams
    tracker: ContextTracker
    prompt_tail: tuple[int, ...]
    output: list[int]  # the engine's live list; read, never written

    def context_at(self, position: int) -> list[int]:
        """The last `width` tokens before output position `position` (prompt tail, then output)."""
        out, width = self.output, self.params.width
        if position >= width:
            return out[position - width : position]
        return [*self.prompt_tail[max(0, len(self.prompt_tail) - (width - position)) :], *out[:position]]

    def replay(self) -> None:
        """Mark the contexts of tokens already generated as seen: a request resumed after preemption
        rejoins the batch with its output so far and must skip the same contexts as if it never left."""
        for position in range(len(self.output)):
            ctx = self.context_at(position)
            if ctx and min(ctx) < 0:
                break
            self.tracker.is_repeat(ctx, position)

    def step(self) -> list[int] | None:
        """This step's table row (`RowParams.step_row`), or None while the context holds a placeholder."""
        n = len(self.output)
        ctx = self.context_at(n)
        if ctx and min(ctx) < 0:
            return None
        return self.params.step_row(ctx, self.tracker.is_repeat(ctx, n))


def row_params(wm: WatermarkArgs) -> RowParams:
    """The kernel's row parameters for a validated `_wm` entry."""
    return RowParams(
        scheme=Scheme(wm.scheme),
        key=wm.key,
        width=wm.width,
        gamma=wm.gamma,
        delta=wm.delta,
        temperature=wm.temperature if wm.scheme == Scheme.GUMBEL else 1.0,
    )


class BatchWatermarker:
    """Per-slot watermark state of one engine's persistent batch.

    `sealer` opens the key handles in `_wm`; None means the process tree's transport key
    (`server.watermark.transport.current_sealer`).
    """

    def __init__(self, sealer: KeySealer | None = None, *, pin_memory: bool = False) -> None:
        self._sealer = sealer
        self._pin_memory = pin_memory  # stage each step's table in pinned memory when the logits are on CUDA
        self._rows: dict[int, _Row] = {}
        self.placeholder_steps = 0

    def __len__(self) -> int:
        """Number of watermarked requests in the batch."""
        return len(self._rows)

    # -- batch bookkeeping -----------------------------------------------------------------------------
    def add(
        self,
        index: int,
        extra_args: Mapping[str, Any] | None,
        output_token_ids: list[int],
        prompt_token_ids: Sequence[int] | None,
    ) -> bool:
        """A request takes slot `index` (replacing whatever was there). True if it is watermarked.

        ValueError for a malformed or forged `_wm`: admission (`validate_params`) refuses those, so one
        reaching a batch means a bug, and failing loudly beats serving it unwatermarked.
        """
        self._rows.pop(index, None)
        wm = parse_wm(extra_args, self._sealer)
        if wm is None:
            return False
        params = row_params(wm)
        tail = tuple(prompt_token_ids[-W_MAX:]) if prompt_token_ids else ()
        row = _Row(params, ContextTracker(params.width), tail, output_token_ids)
        row.replay()
        self._rows[index] = row
        return True

    def remove(self, index: int) -> None:
        self._rows.pop(index, None)

    def move(self, a: int, b: int, swap: bool) -> None:
        """`swap`: slots a and b exchange requests. Otherwise the request in a moves to b (b's is gone)."""
        moving = self._rows.pop(a, None)
        other = self._rows.pop(b, None)
        if swap and other is not None:
            self._rows[a] = other
        if moving is not None:
            self._rows[b] = moving

    # -- per step --------------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Watermark the rows of watermarked requests in place; every other row keeps its bits."""
        if not self._rows:
            return logits
        num_rows = logits.shape[0]
        rows: list[list[int] | None] = [None] * num_rows
        live = False
        for index, row in self._rows.items():
            if index >= num_rows:
                raise RuntimeError(f"watermarked slot {index} is outside a logits batch of {num_rows} rows")
            step = row.step()
            if step is None:
                self.placeholder_steps += 1
                if self.placeholder_steps == 1:
                    log.warning("watermark context held a placeholder token; that step was left unmarked")
                continue
            rows[index] = step
            live = live or not step[COL_SKIP]
        if live:
            pin = self._pin_memory and logits.is_cuda
            apply_watermark(logits, WatermarkBatch.pack(rows, logits.device, pin_memory=pin))
        return logits
