"""Random watermark batches for the kernel tests: every scheme, off and skipped rows, odd widths and parameters."""

from __future__ import annotations

import random

from kernels.watermark_params import RowParams, Scheme


def random_rows(rng: random.Random, n_rows: int, vocab: int, keys: list[bytes] | None = None) -> list[RowParams | None]:
    """`n_rows` rows (None: not watermarked); keys drawn from `keys`, or a fresh one per row."""
    rows: list[RowParams | None] = []
    for _ in range(n_rows):
        kind = rng.choice(["off", "skip", 1, 1, 2, 2, 3, 3])
        if kind == "off":
            rows.append(None)
            continue
        scheme = Scheme(kind) if kind != "skip" else Scheme(rng.choice([1, 2, 3]))
        context = [rng.randrange(vocab) for _ in range(rng.randrange(0, 10))]
        rows.append(
            RowParams(
                scheme,
                rng.choice(keys) if keys else rng.randbytes(16),
                context,
                width=rng.randrange(1, 9),
                gamma=rng.choice([0.25, 0.5, 0.1]),
                delta=rng.choice([2.0, 1.0, 4.5]),
                temperature=rng.choice([1.0, 0.7, 1.5]),
                skip=kind == "skip",
            )
        )
    return rows
