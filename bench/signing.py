"""Model hashing and signature verification throughput, against the model-signing CLI on the same files.

For the default model (from `python -m server models import-default --json`) and a synthetic safetensors
model of --gib GiB (default 2) written to a temporary folder, this measures, warm page cache, median of
--repeat runs taken round-robin:

- ours: `digest_folder` with 1 worker and with os.cpu_count() workers, and `verify_folder` (signature check
  with a pinned key + full re-hash + file-by-file comparison + metadata snapshot);
- model-signing 1.1.1 in-process: `hashing.Config().hash()` with nothing ignored (the same serialization);
- the model-signing CLI (`model_signing sign key` / `verify key --no-ignore-git-paths`), which includes its
  Python start-up; the start-up cost is measured separately (`model_signing --help`) and reported.

Signatures are cross-checked: the CLI verifies ours and ours verifies the CLI's. GB/s is 1e9 bytes per second.

    .venv/bin/python bench/signing.py [--gib 2] [--repeat 5] [--keep]

Writes bench/results/signing-<host>-<date>.json. Needs ~gib GiB free in the temp directory; removes it after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.registry.digest import digest_folder  # noqa: E402
from server.registry.signing import generate_signing_key, sign_folder, verify_folder  # noqa: E402

CLI = Path(sys.executable).with_name("model_signing")


def machine() -> dict[str, object]:
    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import importlib.metadata

    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "model_signing": importlib.metadata.version("model-signing"),
        "load_average_at_end": os.getloadavg(),
    }


def default_model_dir() -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "server", "models", "import-default", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return Path(json.loads(out.stdout.strip().splitlines()[-1])["path"])


def synthetic_model(folder: Path, gib: float, shard_mib: int = 512) -> Path:
    """config.json plus bf16 safetensors shards totalling ``gib`` GiB (a random 64 MiB block, repeated)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    block = os.urandom(64 * 2**20)
    shards = max(1, round(gib * 1024 / shard_mib))
    for index in range(shards):
        blocks = shard_mib // 64
        n = len(block)
        header = {
            f"w{b}": {"dtype": "BF16", "shape": [n // 2], "data_offsets": [b * n, (b + 1) * n]} for b in range(blocks)
        }
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / f"model-{index + 1:05d}-of-{shards:05d}.safetensors", "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw)
            for _ in range(blocks):
                handle.write(block)
    return folder


def timed(methods: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds per method. Methods run round-robin (one warm-up round first), so load from other jobs on
    a shared machine spreads over all of them instead of landing on whichever ran at the wrong moment."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(repeat + 1):
        for name, fn in methods.items():
            started = time.perf_counter()
            fn()
            if round_:
                samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_cli(*args: str) -> None:
    result = subprocess.run([str(CLI), "--log-level", "WARNING", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"model_signing {' '.join(args)} failed: {result.stdout}{result.stderr}")


def measure(name: str, folder: Path, work: Path, repeat: int) -> dict[str, object]:
    from model_signing import hashing

    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    key = work / "bench.pem"
    public = key.with_suffix(".pub") if key.exists() else generate_signing_key(key)
    ours_sig, cli_sig = work / f"{name}.ours.sig", work / f"{name}.cli.sig"
    sign_folder(folder, key, ours_sig)
    cores = os.cpu_count() or 1
    cli_sign = ["sign", "key", str(folder), "--signature", str(cli_sig), "--private_key", str(key)]
    cli_verify = ["verify", "key", str(folder), "--signature", str(ours_sig), "--public_key", str(public)]
    methods: dict[str, Callable[[], object]] = {
        "ours_digest_1_worker": lambda: digest_folder(folder, workers=1),
        f"ours_digest_{cores}_workers": lambda: digest_folder(folder, workers=cores),
        "ours_verify": lambda: verify_folder(folder, ours_sig, [public]),
        "model_signing_library_hash": lambda: (
            hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False).hash(folder)
        ),
        "model_signing_cli_sign": lambda: run_cli(*cli_sign, "--no-ignore-git-paths"),
        "model_signing_cli_verify": lambda: run_cli(*cli_verify, "--no-ignore-git-paths"),
        "cli_startup": lambda: subprocess.run([str(CLI), "--help"], capture_output=True, check=True),
    }
    seconds = timed(methods, repeat)
    startup = seconds.pop("cli_startup")
    verify_folder(folder, cli_sig, [public])  # interoperability: the CLI's signature verifies with ours
    result: dict[str, object] = {"bytes": size, "files": sum(1 for p in folder.rglob("*") if p.is_file())}
    result["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
    result["gb_per_s"] = {k: round(size / v / 1e9, 3) for k, v in seconds.items()}
    result["cli_startup_seconds"] = round(startup, 4)
    result["gb_per_s_cli_minus_startup"] = {
        k: round(size / max(seconds[k] - startup, 1e-9) / 1e9, 3)
        for k in ("model_signing_cli_sign", "model_signing_cli_verify")
    }
    result["ratios"] = {
        "ours_verify_vs_cli_verify_speedup": round(seconds["model_signing_cli_verify"] / seconds["ours_verify"], 2),
        "ours_parallel_digest_vs_library_hash_speedup": round(
            seconds["model_signing_library_hash"] / seconds[f"ours_digest_{cores}_workers"], 2
        ),
        "ours_1_worker_vs_library_hash_speedup": round(
            seconds["model_signing_library_hash"] / seconds["ours_digest_1_worker"], 2
        ),
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="size of the synthetic model (GiB)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic model folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-signing-"))
    results: dict[str, object] = {}
    try:
        default = default_model_dir()
        print(f"default model: {default}", file=sys.stderr)
        results["default_model"] = measure("default", default, work, args.repeat)
        print(json.dumps(results["default_model"], indent=2), file=sys.stderr)
        started = time.perf_counter()
        synthetic = synthetic_model(work / "synthetic", args.gib)
        print(f"synthetic model written in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        results[f"synthetic_{args.gib:g}gib"] = measure("synthetic", synthetic, work, args.repeat)
        print(json.dumps(results[f"synthetic_{args.gib:g}gib"], indent=2), file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "signing",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "results": results,
        "note": "warm page cache; median of --repeat round-robin runs after a warm-up round; "
        "CLI timings include its Python start-up (cli_startup_seconds)",
    }
    out = REPO / "bench" / "results" / f"signing-{socket.gethostname()}-{datetime.now(UTC):%Y%m%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
