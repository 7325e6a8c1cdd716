"""Runs the Triton watermark kernel under the interpreter on CPU and compares it with the torch
reference, bit for bit. Started in a subprocess by test_kernel_watermark_triton_cpu.py, because
TRITON_INTERPRET=1 must be set before Triton kernel modules are imported. Prints one JSON line per
case: {"case": ..., "mismatches": n, "first": [[row, col, kernel_bits, reference_bits], ...]}.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import random  # noqa: E402

import torch  # noqa: E402

from kernels.watermark import apply_watermark_reference  # noqa: E402
from kernels.watermark_params import RowParams, Scheme, WatermarkBatch  # noqa: E402
from kernels.watermark_triton import apply_watermark_triton  # noqa: E402

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def random_rows(rng: random.Random, n_rows: int, vocab: int, seed: int) -> list[RowParams | None]:
    rows: list[RowParams | None] = []
    for _ in range(n_rows):
        choice = rng.choice(["off", "skip", 1, 2, 3, 3, 1, 2, "gated", "gated"]) if n_rows > 1 else [1, 2, 3][seed % 3]
        if choice == "off":
            rows.append(None)
            continue
        if choice == "gated":  # confidence-gated KGW: open or closed depending on the row's top probability
            scheme = Scheme(rng.choice([1, 2]))
        else:
            scheme = Scheme(choice) if choice != "skip" else Scheme(rng.choice([1, 2, 3]))
        rows.append(
            RowParams(
                scheme,
                rng.randbytes(16),
                [rng.randrange(vocab) for _ in range(rng.randrange(0, 10))],
                width=rng.randrange(1, 9),
                gamma=rng.choice([0.25, 0.1, 0.5, 0.9]),
                delta=rng.choice([2.0, 0.5, 7.25] if choice == "gated" else [2.0, 0.5, -1.5, 7.25]),
                temperature=rng.choice([1.0, 0.7, 1.9]),
                skip=choice == "skip",
                gate=rng.choice([0.02, 0.3, 1.0]) if choice == "gated" else 0.0,
            )
        )
    return rows


def random_logits(rng: random.Random, n_rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.getrandbits(32))
    x = torch.randn(n_rows, vocab, generator=gen) * 3
    for r in range(n_rows):  # sprinkle special values (NaN or +inf close a gated row: some rows go without)
        specials = (float("nan"), float("-inf"), float("inf"), -0.0, 0.0) if rng.random() < 0.5 else (-0.0, 0.0)
        for value in specials:
            x[r, rng.randrange(vocab)] = value
    return x.to(dtype)


def run_case(seed: int, n_rows: int, vocab: int, dtype: torch.dtype, config: tuple[int, int] | None) -> dict:
    rng = random.Random(seed)
    rows = random_rows(rng, n_rows, vocab, seed)
    batch = WatermarkBatch.build(rows)
    x = random_logits(rng, n_rows, vocab, dtype)
    for i, row in enumerate(rows):  # gated rows: no NaN/+inf (which close them) and a few near-ties at the top
        if row is not None and row.gate:
            clean = torch.randn(vocab, generator=torch.Generator().manual_seed(seed * 31 + i)) * 3
            top = float(clean.max())
            for j in range(6):
                clean[rng.randrange(vocab)] = top + 1.0 - 0.3 * j
            x[i] = clean.to(dtype)
    kernel, reference = x.clone(), x.clone()
    apply_watermark_triton(kernel, batch, config=config)
    apply_watermark_reference(reference, batch)
    kb, rb = kernel.view(BITS[dtype]), reference.view(BITS[dtype])
    diff = (kb != rb).nonzero().tolist()
    return {
        "case": f"seed={seed} B={n_rows} V={vocab} {dtype} config={config}",
        "schemes": [None if r is None else (int(r.scheme), r.skip, r.gate) for r in rows],
        "mismatches": len(diff),
        "first": [[r, c, kb[r, c].item(), rb[r, c].item()] for r, c in diff[:5]],
        "touched": int((kb != x.view(BITS[dtype])).sum()),
        "gated_rows_touched": sum(
            1 for i, r in enumerate(rows) if r is not None and r.gate and bool((kb[i] != x.view(BITS[dtype])[i]).any())
        ),
    }


def main() -> None:
    seed = 0
    for n_rows in (1, 3):
        for vocab in (1000, 4099):
            for dtype in (torch.float32, torch.bfloat16):
                for config in (None, (4096, 8)):
                    seed += 1
                    print(json.dumps(run_case(seed, n_rows, vocab, dtype, config)), flush=True)


if __name__ == "__main__":
    main()
