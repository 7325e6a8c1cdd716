"""The watermark logits operation on one GPU: our fused kernel against the copy floor and transformers.

For vocab 49,152 and 128,256 x batch 1, 32 and 256, fp32 logits, every row watermarked:

  floor_ms          one read plus one write of the logits at the measured device copy bandwidth
  ours_ms           `kernels.watermark.apply_watermark` (Triton), CUDA events, median of --iters after warm-up;
                    the parameter table is built beforehand (its host cost is reported as build_ms)
  build_ms          host time per decode step of packing the batch's rows (`RowParams.step_row`,
                    `WatermarkBatch.pack` into pinned memory, non-blocking copy): what the processor adds
  transformers_ms   `transformers.generation.logits_process.WatermarkLogitsProcessor` on the same logits
                    and a [batch, 64] history (same settings as ANCHORS.md: greenlist 0.25, bias 2.0,
                    lefthash, context width 1)

Schemes: kgw-lefthash width 1 (the like-for-like comparison with transformers), kgw-selfhash width 4,
gumbel width 4 (the logits-side Gumbel of the older schemes), kgw-gated (what greedy requests get: gate and
near-tie window computed on the device, then the kernel) and gumbel-sampler (what sampled requests get:
`sample_gumbel`, the keyed choice inside vLLM's sampler, which replaces vLLM's own draw for those rows).
Before timing, each configuration is checked bit for bit against the torch reference.
The same run measures every number, so ratios compare like with like. Needs CUDA and Triton:

    python bench/watermark_kernel.py [--iters 100]

Writes bench/results/watermark_kernel-<gpu name>-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kernels.watermark import apply_watermark, apply_watermark_reference, sample_gumbel  # noqa: E402
from kernels.watermark_params import RowParams, Scheme, WatermarkBatch  # noqa: E402

VOCABS = (49_152, 128_256)
BATCHES = (1, 32, 256)
SCHEMES = {
    "kgw-lefthash": (Scheme.KGW_LEFTHASH, 1),
    "kgw-selfhash": (Scheme.KGW_SELFHASH, 4),
    "gumbel": (Scheme.GUMBEL, 4),
    "kgw-gated": (Scheme.KGW_SELFHASH, 4),  # greedy requests: gate 0.5, the gate computed on the device
    "gumbel-sampler": (Scheme.GUMBEL, 4),  # sampled requests: the choice inside vLLM's sampler (sample_gumbel)
}
GATE = {"kgw-gated": 0.5}


def cuda_ms(fn, iters: int, warmup: int = 10, setup=None) -> float:
    """Median CUDA-event time of fn() in ms; `setup` (untimed) runs before each call."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if setup:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(iters: int) -> float:
    """Bytes per second moved by a device-to-device copy (read + write counted), 1 GiB buffers."""
    n = 1 << 28  # 1 GiB of fp32
    src, dst = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    ms = cuda_ms(lambda: dst.copy_(src), iters)
    return 2 * n * 4 / (ms / 1e3)


def rows_for(
    scheme: Scheme, width: int, batch: int, vocab: int, rng: random.Random, gate: float = 0.0
) -> list[RowParams]:
    return [
        RowParams(
            scheme, rng.randbytes(16), [rng.randrange(vocab) for _ in range(width)], width=width, temperature=0.8,
            gate=gate,
        )
        for _ in range(batch)
    ]  # fmt: skip


def check_exact(logits: torch.Tensor, batch: WatermarkBatch, name: str) -> None:
    """Bit for bit against the torch reference; a gated row may decide its gate differently only where its top
    probability lies within float rounding of the gate (at most one row here), and the sampler's choice only
    on a float-log near-tie."""
    if name == "gumbel-sampler":
        ours = sample_gumbel(logits, batch).cpu()
        ref = sample_gumbel(logits.cpu(), batch.to("cpu"))
        if int((ours != ref).sum()) > 1:
            raise SystemExit(f"sampler choices differ in {int((ours != ref).sum())} rows")
        return
    ours, ref = logits.clone(), logits.cpu()
    apply_watermark(ours, batch)
    apply_watermark_reference(ref, batch.to("cpu"))
    differ = (ours.cpu().view(torch.int32) != ref.view(torch.int32)).any(dim=1)
    if int(differ.sum()) > (1 if name in GATE else 0):
        bad = differ.nonzero()[:5].flatten().tolist()
        raise SystemExit(f"kernel and reference differ in rows {bad}")


def transformers_ms(vocab: int, batch: int, logits: torch.Tensor, iters: int) -> float | None:
    try:
        from transformers.generation.logits_process import WatermarkLogitsProcessor
    except ImportError:
        return None
    proc = WatermarkLogitsProcessor(vocab, "cuda", greenlist_ratio=0.25, bias=2.0, seeding_scheme="lefthash")
    input_ids = torch.randint(0, vocab, (batch, 64), device="cuda")
    work = logits.clone()
    return cuda_ms(lambda: proc(input_ids, work), max(10, iters // 5), warmup=3, setup=lambda: work.copy_(logits))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rng = random.Random(0)
    bandwidth = copy_bandwidth(args.iters)
    rows_out = []
    for vocab in VOCABS:
        for batch in BATCHES:
            logits = torch.randn(batch, vocab, device="cuda") * 3
            top = logits.amax(dim=1, keepdim=True)
            logits.scatter_(1, torch.randint(vocab, (batch, 6), device="cuda"), top + 0.5)  # near-ties: gates open
            floor = 2 * batch * vocab * 4 / bandwidth * 1e3
            hf = None if args.skip_transformers else transformers_ms(vocab, batch, logits, args.iters)
            for name, (scheme, width) in SCHEMES.items():
                params = rows_for(scheme, width, batch, vocab, rng, GATE.get(name, 0.0))
                t0 = time.perf_counter()
                for _ in range(20):  # what the processor does per step: pack rows, pinned non-blocking copy
                    wb = WatermarkBatch.pack([p.step_row(p.context) for p in params], "cuda", pin_memory=True)
                build = (time.perf_counter() - t0) / 20 * 1e3
                torch.cuda.synchronize()
                if name == "gumbel-sampler":  # the sampler hook keeps its table on the host
                    wb = WatermarkBatch.pack([p.step_row(p.context) for p in params])
                check_exact(logits, wb, name)
                work = logits.clone()
                step = (lambda wb=wb, work=work: sample_gumbel(work, wb)) if name == "gumbel-sampler" else None
                ours = cuda_ms(
                    step or (lambda wb=wb, work=work: apply_watermark(work, wb)),
                    args.iters,
                    setup=lambda work=work, src=logits: work.copy_(src),  # untimed: every call sees fresh logits
                )
                row = {
                    "vocab": vocab, "batch": batch, "scheme": name, "floor_ms": round(floor, 4),
                    "ours_ms": round(ours, 4), "build_ms": round(build, 3), "ours_over_floor": round(ours / floor, 2),
                    "transformers_ms": None, "transformers_over_ours": None,
                }  # fmt: skip
                if name == "kgw-lefthash" and hf is not None:
                    row["transformers_ms"] = round(hf, 4)
                    row["transformers_over_ours"] = round(hf / ours, 1)
                rows_out.append(row)
                print(
                    f"V={vocab:>6} B={batch:>3} {name:<13} floor {floor:8.4f} ms  ours {ours:8.4f} ms "
                    f"({ours / floor:6.1f}x floor)  build {build:6.3f} ms  transformers "
                    + (f"{row['transformers_ms']:8.3f} ms" if row["transformers_ms"] is not None else "       -")
                )
    gpu = torch.cuda.get_device_name()
    result = {
        "gpu": gpu,
        "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "iters": args.iters,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "rows": rows_out,
    }
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    out = REPO / "bench" / "results" / f"watermark_kernel-{slug}-{datetime.now(UTC):%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
