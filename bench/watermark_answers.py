"""Greedy answers under the watermark: what kgw-gated costs in answer quality and what it gives in detection.

For each configuration (gate, delta, warmup) of kgw-gated, the watermark of greedy requests under the
default `auto` scheme, on the default model in an engine built like the server's:

  QA      every question of bench/data/qa_short.jsonl (bench/qa_set.py scores it) answered greedily, each
          under a fresh random key, against the same question answered without a watermark: accuracy on,
          accuracy off, the share of answers that are identical, and how many changed from right to wrong
          and from wrong to right;
  open    --open open-ended prompts (essays, stories, explanations) answered greedily with exactly --tokens
          tokens under fresh keys, decoded and re-tokenized, then detected as the server does (model
          confidences from the engine, the key's two tests with Bonferroni): detection rate at 1e-3 and
          1e-4 for prefixes of 25/50/100/200 tokens, with 20% of the tokens replaced, and false positives
          of the same prompts' unwatermarked answers tested against the same keys.

The trade-off curve in docs/watermark.md comes from running it over a grid:

    .venv/bin/python bench/watermark_answers.py --configs 0.2,2,0 0.4,2,16 0.5,2,16 ...

Writes bench/results/watermark_answers-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qa_set  # noqa: E402
from wm_engine import Bench, machine, prompts, random_key, write_result  # noqa: E402

LENGTHS = (25, 50, 100, 200)
THRESHOLDS = (1e-3, 1e-4)


def parse_config(text: str) -> tuple[float, float, int]:
    gate, delta, warmup = text.split(",")
    return float(gate), float(delta), int(warmup)


def qa_study(bench: Bench, config: tuple[float, float, int] | None, questions, baseline=None) -> dict:
    """Answers of every question (None config: unwatermarked); with `baseline`, the comparison."""
    gate, delta, warmup = config or (0.0, 0.0, 0)
    keys = [random_key(gate=gate, delta=delta, warmup=warmup) if config else None for _ in questions]
    prompt_ids = [bench.chat(q.question) for q in questions]
    outs = bench.generate(prompt_ids, [bench.params(k, 0.0, 48) for k in keys])
    answers = [bench.tokenizer.decode(o) for o in outs]
    right = [qa_set.is_correct(a, q) for a, q in zip(answers, questions, strict=True)]
    result: dict = {"accuracy": round(sum(right) / len(right), 4), "answers": answers, "right": right}
    if baseline is not None:
        same = [a == b for a, b in zip(answers, baseline["answers"], strict=True)]
        was = baseline["right"]
        result.update(
            identical=round(sum(same) / len(same), 4),
            right_to_wrong=sum(1 for a, b in zip(was, right, strict=True) if a and not b),
            wrong_to_right=sum(1 for a, b in zip(was, right, strict=True) if b and not a),
            accuracy_delta_pp=round(100 * (result["accuracy"] - baseline["accuracy"]), 2),
        )
    return result


def open_study(bench: Bench, config: tuple[float, float, int], texts: list[str], tokens: int, plain: list) -> dict:
    from server.watermark.detector import detect

    gate, delta, warmup = config
    keys = [random_key(gate=gate, delta=delta, warmup=warmup) for _ in texts]
    prompt_ids = [bench.chat(t) for t in texts]
    outs = bench.generate(prompt_ids, [bench.params(k, 0.0, tokens, exact=True) for k in keys])
    answers = [bench.tokenizer.encode(bench.tokenizer.decode(o)) for o in outs]  # what a user pastes back
    rng = random.Random(2)
    edited = [[rng.randrange(bench.vocab) if rng.random() < 0.2 else t for t in a] for a in answers]
    conf = bench.confidences(answers)
    conf_edited = bench.confidences(edited)
    conf_plain = bench.confidences(plain)
    entry: dict = {"answers": len(answers), "median_tokens": statistics.median(map(len, answers))}

    def p(ids, key, c) -> float:
        return detect(ids, [key], bench.vocab, threshold=1.0, confidences=c).p_value

    full = [p(a, k, c) for a, k, c in zip(answers, keys, conf, strict=True)]
    for th in THRESHOLDS:
        for n in LENGTHS:
            if n <= tokens:
                found = [p(a[:n], k, c[:n]) < th for a, k, c in zip(answers, keys, conf, strict=True)]
                entry[f"tpr@{th:g}_len{n}"] = round(sum(found) / len(found), 4)
        replaced = [p(a, k, c) < th for a, k, c in zip(edited, keys, conf_edited, strict=True)]
        entry[f"tpr_20pct_replaced@{th:g}"] = round(sum(replaced) / len(replaced), 4)
        negatives = [p(a, k, c) < th for a, k, c in zip(plain, keys, conf_plain, strict=True)]
        entry[f"fpr_unwatermarked@{th:g}"] = round(sum(negatives) / len(negatives), 4)
    entry["median_log10_p"] = round(statistics.median(_log10(x) for x in full), 2)
    return entry


def _log10(p: float) -> float:
    import math

    return math.log10(p) if p > 0 else -300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["0.2,2,0"], help="gate,delta,warmup triples")
    parser.add_argument("--questions", type=int, default=0, help="0: every question")
    parser.add_argument("--open", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    bench = Bench()
    questions = qa_set.load()
    if args.questions:
        questions = random.Random(0).sample(questions, args.questions)
    baseline = qa_study(bench, None, questions)
    print(f"off: accuracy {baseline['accuracy']:.3f}", flush=True)
    texts = prompts(args.open, seed=5)
    plain = bench.generate(
        [bench.chat(t) for t in texts], [bench.params(None, 0.0, args.tokens, exact=True)] * len(texts)
    )
    plain = [bench.tokenizer.encode(bench.tokenizer.decode(o)) for o in plain]
    curve = []
    for text in args.configs:
        config = parse_config(text)
        qa = qa_study(bench, config, questions, baseline)
        entry = {
            "gate": config[0],
            "delta": config[1],
            "warmup": config[2],
            "qa": {k: v for k, v in qa.items() if k not in ("answers", "right")},
            "open": open_study(bench, config, texts, args.tokens, plain) if args.open else None,
        }
        curve.append(entry)
        print(json.dumps(entry), flush=True)
    result = {
        "benchmark": "watermark_answers",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "engine_dtype": bench.dtype,
        "questions": len(questions),
        "sources": sorted({q.source for q in questions}),
        "baseline_accuracy": baseline["accuracy"],
        "open_prompts": len(texts),
        "tokens": args.tokens,
        "curve": curve,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_result("watermark_answers", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
