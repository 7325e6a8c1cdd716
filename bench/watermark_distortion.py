"""Is the sampled-request watermark distortion-free? Watermarked draws against vLLM's own sampling.

The default model in an engine built like the server's (watermark processor and sampler hook installed).
For each prompt and each sampling setting (temperature, top_p, top_k, min_p, presence and frequency
penalties: every one of them is applied before the keyed choice), --draws requests of --tokens tokens are
generated watermarked, each under its own fresh key, and as many without a watermark (vLLM's sampler).
Output positions 0..3 are never marked (their context lies in the prompt, see
server/watermark/processor.py), so the test looks at the tokens of the first marked positions, 4 and 5:
if the keyed choice is an exact sample of the distribution the request asked for, the watermarked and the
unwatermarked tokens there have the same distribution. Per (prompt, setting, position) a chi-square test of
homogeneity on the 2 x K table (tokens seen fewer than --min-count times pooled into one cell). Tables of
one position are independent (each (prompt, setting) has its own requests) and are combined by adding
chi-square statistics and degrees of freedom; the two positions share their requests, so each position is
combined on its own and the smaller of the two p-values is doubled (Bonferroni). A second, per-key check: with only
--keys keys (each used for many draws), the same test, showing the result does not rest on key variety. Under
one key the choice is a function of (key, context), so two draws that share their key and the 4 tokens before
a position (vLLM's own randomness chose those) repeat its token: that check counts each (key, context) pair's
first draw only, on both sides (the unwatermarked draws dealt the same keys; the repeats are the documented
same-key, same-context property, not a bias).

    .venv/bin/python bench/watermark_distortion.py [--draws 700] [--prompts 5]

Writes bench/results/watermark_distortion-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wm_engine import Bench, machine, prompts, random_key, write_result  # noqa: E402

from server.watermark.settings import WatermarkSettings  # noqa: E402
from server.watermark.types import GUMBEL, effective_width  # noqa: E402

SETTINGS = [
    {"temperature": 1.0, "top_p": 0.9, "presence_penalty": 0.5},
    {"temperature": 0.7, "top_k": 40, "frequency_penalty": 0.8},
    {"temperature": 1.2, "min_p": 0.05, "top_p": 0.95, "repetition_penalty": 1.2},
]
# The sampled scheme's context width under the deployment defaults: output positions below it are never marked.
WIDTH = effective_width(GUMBEL, WatermarkSettings().width)
POSITIONS = (WIDTH, WIDTH + 1)


def homogeneity(a: list[int], b: list[int], min_count: int) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom of the 2 x K table of two samples of tokens."""
    ca, cb = Counter(a), Counter(b)
    cells = [t for t in set(ca) | set(cb) if ca[t] + cb[t] >= min_count]
    rows = [[ca[t] for t in cells], [cb[t] for t in cells]]
    rest = [len(a) - sum(rows[0]), len(b) - sum(rows[1])]
    if rest[0] + rest[1] > 0:
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    if len(rows[0]) < 2:
        return 0.0, 0
    from scipy.stats import chi2_contingency

    stat, _, dof, _ = chi2_contingency(rows, correction=False)
    return float(stat), int(dof)


def first_per_context(outs: list[list[int]], key_ids: list[str], pos: int) -> list[list[int]]:
    """The draws whose (key, context of position `pos`) pair has not occurred before among `outs`."""
    seen: set[tuple[str, tuple[int, ...]]] = set()
    kept = []
    for out, key_id in zip(outs, key_ids, strict=True):
        pair = (key_id, tuple(out[pos - WIDTH : pos]))
        if pair not in seen:
            seen.add(pair)
            kept.append(out)
    return kept


def combine(tables: list[dict], position: int, prefix: str) -> dict:
    """Sum of the chi-square statistics and degrees of freedom of one position's (independent) tables."""
    from scipy.stats import chi2

    rows = [t for t in tables if t["position"] == position]
    stat = sum(t[f"{prefix}chi2"] for t in rows)
    dof = sum(t[f"{prefix}dof"] for t in rows)
    return {"tables": len(rows), "chi2": round(stat, 2), "dof": dof, "p": float(chi2.sf(stat, dof)) if dof else None}


def bonferroni(combined: dict) -> float | None:
    ps = [c["p"] for c in combined.values() if c["p"] is not None]
    return min(1.0, len(ps) * min(ps)) if ps else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=700, help="per prompt and setting, each side")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=6)
    parser.add_argument("--keys", type=int, default=50, help="keys of the few-keys check")
    parser.add_argument("--min-count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="the engine's seed (vLLM's own draws)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from scipy.stats import chi2

    started = time.perf_counter()
    bench = Bench(seed=args.seed)
    texts = prompts(args.prompts, seed=9)
    tables = []
    few_keys = [random_key() for _ in range(args.keys)]
    total_marked = 0
    for text in texts:
        prompt = bench.chat(text)
        for setting in SETTINGS:
            temperature = setting["temperature"]
            rest = {k: v for k, v in setting.items() if k != "temperature"}
            jobs = [random_key() for _ in range(args.draws)] + [None] * args.draws
            jobs += [few_keys[i % len(few_keys)] for i in range(args.draws)]
            outs = bench.generate(
                [prompt] * len(jobs), [bench.params(k, temperature, args.tokens, exact=True, **rest) for k in jobs]
            )
            marked, plain, few = outs[: args.draws], outs[args.draws : 2 * args.draws], outs[2 * args.draws :]
            total_marked += len(marked) + len(few)
            few_key_ids = [few_keys[i % len(few_keys)].key_id for i in range(args.draws)]
            for pos in POSITIONS:
                stat, dof = homogeneity([o[pos] for o in marked], [o[pos] for o in plain], args.min_count)
                # Under one key the choice is a function of the context: draws repeating a (key, context)
                # pair repeat its token, so only each pair's first draw is an independent sample. The
                # unwatermarked draws go through the same selection (as if they had been dealt the same keys),
                # so both sides keep the same mix of contexts.
                distinct = first_per_context(few, few_key_ids, pos)
                plain_same = first_per_context(plain, few_key_ids, pos)
                few_stat, few_dof = homogeneity(
                    [o[pos] for o in distinct], [o[pos] for o in plain_same], args.min_count
                )
                tables.append(
                    {
                        "prompt": text,
                        "setting": setting,
                        "position": pos,
                        "chi2": round(stat, 2),
                        "dof": dof,
                        "p": round(float(chi2.sf(stat, dof)), 4) if dof else None,
                        "few_keys_chi2": round(few_stat, 2),
                        "few_keys_dof": few_dof,
                        "few_keys_p": round(float(chi2.sf(few_stat, few_dof)), 4) if few_dof else None,
                        "few_keys_distinct_draws": [len(distinct), len(plain_same)],
                        "distinct_tokens": len({o[pos] for o in marked + plain}),
                    }
                )
                print(json.dumps(tables[-1]), flush=True)
    combined = {f"position_{pos}": combine(tables, pos, "") for pos in POSITIONS}
    few_combined = {f"position_{pos}": combine(tables, pos, "few_keys_") for pos in POSITIONS}
    result = {
        "benchmark": "watermark_distortion",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "engine_dtype": bench.dtype,
        "engine_seed": args.seed,
        "draws_watermarked_fresh_keys": args.draws * len(texts) * len(SETTINGS),
        "draws_watermarked_few_keys": args.draws * len(texts) * len(SETTINGS),
        "draws_unwatermarked": args.draws * len(texts) * len(SETTINGS),
        "watermarked_next_token_draws_tested": len(POSITIONS) * args.draws * len(texts) * len(SETTINGS),
        "few_keys": args.keys,
        "settings": SETTINGS,
        "positions": POSITIONS,
        "combined": {**combined, "p_bonferroni": bonferroni(combined)},
        "combined_few_keys": {**few_combined, "p_bonferroni": bonferroni(few_combined)},
        "tables": tables,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps({k: result[k] for k in ("combined", "combined_few_keys", "draws_watermarked_fresh_keys")}))
    write_result("watermark_distortion", result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
