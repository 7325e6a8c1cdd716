"""Watermark detection quality on the default model, through the real path (vLLM + our processor and hook).

Two modes, both under the default `auto` scheme (the deployment's configured gate, delta and warmup):

  sampled  temperature 1.0, top_p 0.95: Gumbel-max in vLLM's sampler
  greedy   temperature 0: kgw-gated (only where the model is unsure)

Every prompt is answered with exactly --tokens tokens (min_tokens = max_tokens) under one of two random
`auto` keys, the caller's organization's and the deployment default's (what the detection route tries:
four tests, Bonferroni); answers are decoded to text and re-tokenized (what the detector sees from a
user), scored by the model as the route does (confidences, for kgw-gated), then tested:

  * detection rate at each threshold for prefixes of 25/50/100/200 tokens, and whether the right key
    was named;
  * after replacing 20% of the tokens with random vocabulary tokens;
  * false positives on human-written text (package descriptions from the installed distributions'
    METADATA, cut into --tokens-token chunks) and on unwatermarked answers of the same model (sampled
    and greedy): --negatives human texts and --model-negatives answers per mode.

The full study is --prompts 500 --tokens 200 --negatives 1000 --model-negatives 250 (the defaults); on a 2-core
CPU start small:

    .venv/bin/python bench/watermark_quality.py --prompts 40 --negatives 100 --model-negatives 40

Writes bench/results/watermark_quality-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import site
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wm_engine import Bench, machine, prompts, random_key, write_result  # noqa: E402

LENGTHS = (25, 50, 100, 200)
MODES = {"sampled": {"temperature": 1.0, "top_p": 0.95}, "greedy": {"temperature": 0.0}}


def human_negatives(tokenizer, count: int, length: int) -> list[list[int]]:
    """Chunks of `length` tokens of the long descriptions in installed packages' METADATA files."""
    files = sorted({f for d in site.getsitepackages() for f in glob.glob(os.path.join(d, "*.dist-info", "METADATA"))})
    chunks: list[list[int]] = []
    for path in files:
        body = Path(path).read_text(encoding="utf-8", errors="replace").partition("\n\n")[2]
        ids = tokenizer.encode(body)
        chunks += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    random.Random(1).shuffle(chunks)
    return chunks[:count]


def answers(bench: Bench, texts: list[str], keys: list, mode: str, tokens: int) -> list[list[int]]:
    sampling = dict(MODES[mode])
    temperature = sampling.pop("temperature")
    prompt_ids = [bench.chat(t) for t in texts]
    params = [bench.params(k, temperature, tokens, exact=True, **sampling) for k in keys]
    outs = bench.generate(prompt_ids, params)
    return [bench.tokenizer.encode(bench.tokenizer.decode(o)) for o in outs]  # what a user pastes back


def rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def study(args: argparse.Namespace) -> dict:
    from server.watermark.detector import detect

    bench = Bench()
    org, default = random_key(), random_key()
    candidates = [org, default]
    texts = prompts(args.prompts)
    rng = random.Random(2)
    started = time.perf_counter()
    result: dict = {"modes": {}, "thresholds": args.thresholds, "key_params": _params(org)}

    def p_values(items: list[list[int]]) -> list[float]:
        conf = bench.confidences(items)
        return [
            detect(a, candidates, bench.vocab, threshold=1.0, confidences=c).p_value
            for a, c in zip(items, conf, strict=True)
        ]

    for mode in MODES:
        keys = [org if i % 2 == 0 else default for i in range(len(texts))]
        marked = answers(bench, texts, keys, mode, args.tokens)
        conf = bench.confidences(marked)
        found = [
            detect(a, candidates, bench.vocab, threshold=1.0, confidences=c) for a, c in zip(marked, conf, strict=True)
        ]
        entry: dict = {"answers": len(marked), "median_tokens": statistics.median(map(len, marked))}
        edited = [[rng.randrange(bench.vocab) if rng.random() < 0.2 else t for t in a] for a in marked]
        edited_p = p_values(edited)
        by_length = {n: p_values([a[:n] for a in marked]) for n in LENGTHS if n < args.tokens}
        for th in args.thresholds:
            entry[f"tpr@{th:g}"] = rate([f.p_value < th for f in found])
            right = [f.key_id == k.key_id for f, k in zip(found, keys, strict=True) if f.p_value < th]
            entry[f"right_key@{th:g}"] = rate(right)
            for n, ps in by_length.items():
                entry[f"tpr@{th:g}_len{n}"] = rate([p < th for p in ps])
            entry[f"tpr_20pct_replaced@{th:g}"] = rate([p < th for p in edited_p])
        entry["schemes_named"] = sorted({f.scheme for f in found if f.scheme})
        entry["median_log10_p"] = round(statistics.median(_log10(f.p_value) for f in found), 1)
        result["modes"][mode] = entry
        print(mode, json.dumps(entry), flush=True)
    result["generation_and_detection_seconds"] = round(time.perf_counter() - started, 1)

    negatives = {"human": human_negatives(bench.tokenizer, args.negatives, args.tokens)}
    neg_texts = prompts(args.model_negatives, seed=3)
    for mode in MODES:
        negatives[f"model_unwatermarked_{mode}"] = answers(bench, neg_texts, [None] * len(neg_texts), mode, args.tokens)
    for name, items in negatives.items():
        ps = p_values(items)
        fpr = {f"fpr@{th:g}": rate([p < th for p in ps]) for th in args.thresholds}
        result[f"negatives_{name}"] = {"count": len(items), **fpr, "min_p": min(ps, default=None)}
        print(name, json.dumps(result[f"negatives_{name}"]), flush=True)
    return result


def _params(key) -> dict:
    return {"scheme": key.scheme, "gamma": key.gamma, "delta": key.delta, "gate": key.gate, "warmup": key.warmup}


def _log10(p: float) -> float:
    return math.log10(p) if p > 0 else -300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--negatives", type=int, default=1000, help="human-written negatives")
    parser.add_argument("--model-negatives", type=int, default=250, help="unwatermarked answers per mode")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    result = study(args)
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["machine"] = machine()
    result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_result("watermark_quality", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
