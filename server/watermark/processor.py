"""`BatchWatermarker`: the engine-independent half of the watermark (plain Python + torch).

The vLLM adapter (`server.watermark.vllm_adapter`) forwards vLLM's persistent-batch updates here: `add`
when a request takes a batch slot, `remove` when it leaves, `move` when the batch is condensed or
reordered, and `apply` once per decode step with the logits of every slot, in the logits-processor hook
(before penalties, temperature, min-p, top-k and top-p).

Two kinds of watermarked rows, by the scheme the server chose for the request (`_wm.s`):

  * KGW rows (kgw-gated for greedy requests; kgw-selfhash / kgw-lefthash where configured) are applied
    to the logits in `apply`, through `kernels.watermark.apply_watermark`.
  * Gumbel rows (sampled requests) are *not* touched in `apply`: their step rows are handed to vLLM's
    sampler through the `SamplerChannel`, which chooses the token with the keyed noise after every filter
    the request asked for (`kernels.watermark.sample_gumbel`). A Gumbel row with no sampler hook installed
    is a bug that would serve unmarked, undetectable text: `apply` raises instead (fail closed).

Per watermarked request the row keeps its validated parameters (`RowParams`), a `ContextTracker` and a
*live reference* to the request's output token list (vLLM appends to that list; we never copy it). The
context of output position n is output[n - width : n]. Positions whose context is not all inside the
answer (n < width), and for kgw-gated the first `warmup` positions, are never marked: the detector only
ever sees the answer, so it cannot score them, and a mark there would cost quality for nothing (the first
tokens of a chat answer all follow the same template context). A context that already occurred earlier in
this response is left untouched too (repeated n-grams would otherwise push the text into loops and
inflate false positives; the detector scores each once). An unmarked Gumbel position is sampled by
vLLM's own sampler, with its own (or the request's seeded) randomness.

Rows without `_wm` cost nothing; a batch without watermarked rows returns the logits untouched without
building anything. A placeholder token (a negative id, which vLLM's asynchronous scheduling uses for a
token still being copied back) in the context is never hashed: the row is left untouched for that step
and counted in `placeholder_steps` (the adapter declares that it needs real token ids, so this is a
guard, not a path we expect to take).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kernels.watermark import apply_watermark
from kernels.watermark_params import ContextTracker, RowParams, Scheme, WatermarkBatch
from server.watermark.channel import SamplerChannel
from server.watermark.request import WatermarkArgs, parse_wm
from server.watermark.transport import KeySealer
from server.watermark.types import GUMBEL, KGW_GATED, KGW_GATED_KERNEL_SCHEME

log = logging.getLogger(__name__)

__all__ = ["BatchWatermarker", "SamplerChannel", "row_params"]


@dataclass
class _Row:
    params: RowParams
    tracker: ContextTracker
    output: list[int]  # the engine's live list; read, never written
    first: int  # the first output position that may be marked
    sampled: bool  # a Gumbel row: chosen in the sampler, not here

    def replay(self) -> None:
        """Mark the contexts of tokens already generated as seen: a request resumed after preemption
        rejoins the batch with its output so far and must skip the same contexts as if it never left."""
        width = self.params.width
        for position in range(self.first, len(self.output)):
            ctx = self.output[position - width : position]
            if min(ctx) < 0:
                break
            self.tracker.is_repeat(ctx, position)

    def step(self) -> list[int] | None:
        """This step's table row (`RowParams.step_row`; skip set where nothing is marked), or None while
        the context holds a placeholder."""
        n, width = len(self.output), self.params.width
        if n < self.first:
            return self.params.step_row((), skip=True)
        ctx = self.output[n - width : n]
        if min(ctx) < 0:
            return None
        return self.params.step_row(ctx, self.tracker.is_repeat(ctx, n))


def row_params(wm: WatermarkArgs) -> RowParams:
    """The kernel's row parameters for a validated `_wm` entry."""
    if wm.scheme == KGW_GATED:
        scheme, gate = Scheme(KGW_GATED_KERNEL_SCHEME), wm.gate
    else:
        scheme, gate = Scheme(wm.scheme), 0.0
    return RowParams(
        scheme=scheme,
        key=wm.key,
        width=wm.width,
        gamma=wm.gamma,
        delta=wm.delta,
        temperature=1.0,  # Gumbel rows are sampled after vLLM has applied the request's temperature
        gate=gate,
    )


class BatchWatermarker:
    """Per-slot watermark state of one engine's persistent batch.

    `sealer` opens the key handles in `_wm`; None means the process tree's transport key
    (`server.watermark.transport.current_sealer`). `channel` reaches the engine's sampler hook.
    """

    def __init__(
        self, sealer: KeySealer | None = None, *, pin_memory: bool = False, channel: SamplerChannel | None = None
    ) -> None:
        self._sealer = sealer
        self._pin_memory = pin_memory  # stage each step's table in pinned memory when the logits are on CUDA
        self._channel = channel if channel is not None else SamplerChannel()
        self._rows: dict[int, _Row] = {}
        self.placeholder_steps = 0

    def __len__(self) -> int:
        """Number of watermarked requests in the batch."""
        return len(self._rows)

    # -- batch bookkeeping -----------------------------------------------------------------------------
    def add(self, index: int, extra_args: Mapping[str, Any] | None, output_token_ids: list[int]) -> bool:
        """A request takes slot `index` (replacing whatever was there). True if it is watermarked.

        ValueError for a malformed or forged `_wm`: admission (`validate_params`) refuses those, so one
        reaching a batch means a bug, and failing loudly beats serving it unwatermarked.
        """
        self._rows.pop(index, None)
        wm = parse_wm(extra_args, self._sealer)
        if wm is None:
            return False
        params = row_params(wm)
        first = max(params.width, wm.warmup)
        row = _Row(params, ContextTracker(params.width), output_token_ids, first, wm.scheme == GUMBEL)
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
        """Watermark the KGW rows in place (every other row keeps its bits) and offer this step's Gumbel
        rows to the sampler hook."""
        self._channel.offer(None)
        if not self._rows:
            return logits
        num_rows = logits.shape[0]
        kgw: list[list[int] | None] = [None] * num_rows
        gumbel: list[list[int] | None] = [None] * num_rows
        live_kgw = live_gumbel = False
        for index, row in self._rows.items():
            if index >= num_rows:
                raise RuntimeError(f"watermarked slot {index} is outside a logits batch of {num_rows} rows")
            step = row.step()
            if step is None:
                self.placeholder_steps += 1
                if self.placeholder_steps == 1:
                    log.warning("watermark context held a placeholder token; that step was left unmarked")
                continue
            live = not step[1]  # COL_SKIP
            if row.sampled:
                gumbel[index], live_gumbel = step, live_gumbel or live
            else:
                kgw[index], live_kgw = step, live_kgw or live
        if live_kgw:
            pin = self._pin_memory and logits.is_cuda
            apply_watermark(logits, WatermarkBatch.pack(kgw, logits.device, pin_memory=pin))
        if live_gumbel:
            if not self._channel.installed:
                raise RuntimeError("watermark: a sampled request reached an engine without the sampler hook")
            self._channel.offer(WatermarkBatch.pack(gumbel))  # host memory: the sampler moves what it needs
        return logits
