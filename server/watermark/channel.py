"""`SamplerChannel`: one step's Gumbel rows, from the logits processor to the sampler hook of the same engine
process (no torch here, so the app factory can name the vLLM extension without importing torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kernels.watermark_params import WatermarkBatch


class SamplerChannel:
    """Hands one step's Gumbel rows from the logits processor to the sampler hook of the same engine process.

    `installed` is set by the hook when it is put in place (`vllm_adapter.install_sampler`). `offer` is
    called by every `apply` (None when the step has no Gumbel row), `take` by the sampler hook in the same
    step; a batch is taken at most once and only by a sampler call over the same number of rows.
    """

    def __init__(self) -> None:
        self.installed = False
        self._pending: WatermarkBatch | None = None

    def offer(self, batch: WatermarkBatch | None) -> None:
        self._pending = batch

    def take(self, n_rows: int) -> WatermarkBatch | None:
        batch, self._pending = self._pending, None
        if batch is not None and len(batch) != n_rows:
            raise RuntimeError(f"watermark: a sampler step over {n_rows} rows met Gumbel rows for {len(batch)}")
        return batch
