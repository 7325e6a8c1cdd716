"""What the watermark benchmarks share: an offline vLLM engine built like the server's, with the watermark
extension (logits processor and sampler hook) installed, plus keys, prompts and model confidences.

Imported by bench/watermark_quality.py, watermark_answers.py, watermark_distortion.py and
watermark_overhead.py (run from the repository root; they put bench/ on sys.path).
"""

from __future__ import annotations

import os
import random
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from serving import machine  # noqa: E402

__all__ = ["REPO", "Bench", "machine", "prompts", "random_key", "write_result"]

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


def prompts(n: int, seed: int = 0) -> list[str]:
    """`n` open-ended prompts (essays, stories, explanations), the same for a given seed."""
    combos = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
    random.Random(seed).shuffle(combos)
    return [combos[i % len(combos)] for i in range(n)]


def write_result(benchmark: str, result: dict[str, Any], out: Path | None = None) -> Path:
    """Write `result` to `out`, or bench/results/<benchmark>-<host>-<UTC date>.json; returns the path."""
    import json
    from datetime import UTC, datetime

    name = f"{benchmark}-{machine()['host']}-{datetime.now(UTC):%Y%m%d}.json"
    path = out or REPO / "bench" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def random_key(scheme: str = "auto", **params: Any) -> Any:
    """Fresh key material with the deployment defaults of `[watermark]`, overridden by `params`."""
    from server.watermark.settings import WatermarkSettings
    from server.watermark.types import KeyMaterial

    s = WatermarkSettings()
    values = {"gamma": s.gamma, "delta": s.delta, "width": s.width, "gate": s.gate, "warmup": s.warmup, **params}
    if scheme not in ("auto", "gumbel"):
        values.update(gate=0.0, warmup=0)
    return KeyMaterial(key_id=f"wk_{secrets.token_hex(6)}", scheme=scheme, key=secrets.token_bytes(16), **values)


class Bench:
    """The default model in an offline vLLM engine built as the server builds a CPU (or CUDA) pool's engine."""

    def __init__(self, kv_cache_gib: int = 2, max_model_len: int = 1024, seed: int = 0) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from vllm import LLM

        from server.engine.tokenizer import HfTokenizer
        from server.engine.vllm_engine import _scheduler_args, engine_dtype
        from server.registry.versions import model_folder
        from server.settings import ModelSettings, load_settings
        from server.watermark.vllm_adapter import INSTALL_RPC, vllm_watermark

        settings = load_settings()
        model = settings.models[0]
        pool = next(p for p in settings.pools if p.name == model.pool)
        if torch.cuda.is_available():
            pool = pool.model_copy(update={"device": "cuda"})
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        self.dtype = engine_dtype(pool, model)
        self.path = model_folder(settings, ModelSettings(), progress=False)
        self.tokenizer = HfTokenizer(self.path)
        self.max_model_len = max_model_len
        ext = vllm_watermark()
        self.llm = LLM(
            model=str(self.path),
            dtype=self.dtype,
            max_model_len=max_model_len,
            enforce_eager=True,
            **_scheduler_args(pool, model),
            logits_processors=list(ext.logits_processors),
            worker_extension_cls=ext.worker_extension_cls,
            disable_log_stats=True,
            seed=seed,
        )
        replies = self.llm.collective_rpc(INSTALL_RPC)
        if not replies or not all(r.get("installed") for r in replies):
            raise RuntimeError(f"the watermark sampler hook was not installed: {replies!r}")
        self.vocab = self.tokenizer.vocab_size

    def chat(self, text: str) -> list[int]:
        return self.tokenizer.render_chat([{"role": "user", "content": text}], None)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: Sequence[Any]) -> list[list[int]]:
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], list(params), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def params(self, key: Any | None, temperature: float, tokens: int, *, exact: bool = False, **sampling: Any) -> Any:
        """SamplingParams with the server's `_wm` for `key` (None: unwatermarked). `exact`: min_tokens = max."""
        from vllm import SamplingParams

        from server.watermark.request import watermark_extra_args

        extra = watermark_extra_args(key, temperature) if key is not None else None
        return SamplingParams(
            temperature=temperature,
            max_tokens=tokens,
            min_tokens=tokens if exact else 0,
            extra_args=extra,
            skip_special_tokens=True,
            **sampling,
        )

    def confidences(self, texts: Sequence[Sequence[int]]) -> list[list[tuple[float, ...] | None]]:
        """What the detection route computes (`server.watermark.confidence`), batched over texts."""
        from vllm import SamplingParams

        from server.watermark.confidence import NEUTRAL_TURN, TOP_K

        prefix = self.tokenizer.render_chat(NEUTRAL_TURN, None)
        keep = self.max_model_len - 1 - len(prefix)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=TOP_K)
        prompts_ = [{"prompt_token_ids": [*prefix, *t[:keep]]} for t in texts]
        out = []
        for text, result in zip(texts, self.llm.generate(prompts_, params, use_tqdm=False), strict=True):
            scored: list[tuple[float, ...] | None] = []
            for entry in result.prompt_logprobs[len(prefix) :]:
                ranked = sorted((lp.rank, lp.logprob) for lp in entry.values() if lp.rank and lp.rank <= TOP_K)
                scored.append(tuple(float(v) for _, v in ranked))
            out.append(scored + [None] * (len(text) - len(scored)))
        return out
