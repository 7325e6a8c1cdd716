"""The confidence gate of greedy (gated KGW) rows, shared by the torch path and the Triton launcher.

    m     = max_v x[v]                   x = fp32(logits)
    s     = sum_v exp(x[v] - m)          so the model's top probability at this position is p1 = 1 / s
    open  = s * gate > 1                 i.e. p1 < gate (a row without a finite maximum, or holding a NaN,
                                         stays closed)
    floor = fl(m - delta)                only logits >= floor can win a greedy choice after the bias

Torch ops only, so the CUDA launcher computes the same on the device without a host sync; CPU hosts sum
in one fused loop (`kernels.watermark_cpu.exp_sum`). exp is not correctly rounded and summation orders
differ: the decision can differ between devices or paths only where p1 lies within a few ulp of the gate.
The detector recomputes the gate of each position with the model (its top two prompt log-probabilities,
`server.watermark.detector`), so it scores (about) the positions whose gate was open.
"""

from __future__ import annotations

import torch


def gate_floor(
    x: torch.Tensor,
    delta: torch.Tensor,
    gate: torch.Tensor,
    m: torch.Tensor | None = None,
    exp_sum: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(floor float32 [N], open bool [N]) for the rows `x` [N, V] with their `delta` and `gate` [N]. A
    caller that has them passes each row's maximum `m` (float32) and `exp_sum` (s, with finite m)."""
    if m is None:
        m = x.amax(dim=1).float()  # NaN if the row holds one: closed
    finite = torch.isfinite(m)
    if exp_sum is None:
        exp_sum = torch.exp(x.float() - torch.where(finite, m, 0.0)[:, None]).sum(dim=1)
    return m - delta, (exp_sum * gate > 1.0) & finite
