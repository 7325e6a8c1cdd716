"""Authentication + authorization cost per request, in-process: a cached API key and a JWT.

Times the route dependency exactly as a request runs it (`Requires("inference")`: parse the header, check
cache freshness, HMAC the key or verify the token, compute permissions, queue the audit event), on the
server's own objects built by `create_app` with a SQLite database.

    .venv/bin/python bench/auth.py [--iterations 20000]

Writes bench/results/auth-<host>-<date>.json. Target: p50 under 100 µs for a cached key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starlette.requests import Request  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from server.identity.authz import Requires  # noqa: E402
from tests.unit.conftest import build_app, make_key, wait_ready  # noqa: E402


def request_for(app, header: str) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"authorization", header.encode())],
        "app": app,
        "client": ("127.0.0.1", 5000),
        "query_string": b"",
    }
    return Request(scope)


async def measure(app, header: str, iterations: int) -> dict[str, float]:
    dependency = Requires("inference")
    for _ in range(200):  # warm the cache and the code paths
        await dependency(request_for(app, header))
    samples = []
    for _ in range(iterations):
        req = request_for(app, header)
        started = time.perf_counter_ns()
        await dependency(req)
        samples.append((time.perf_counter_ns() - started) / 1000)
    samples.sort()
    return {
        "p50_us": statistics.median(samples),
        "p99_us": samples[int(0.99 * len(samples))],
        "mean_us": statistics.fmean(samples),
        "iterations": iterations,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20000)
    args = parser.parse_args()
    from server.settings import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        app = build_app(load_settings(data_dir=Path(tmp), engine="fake"))
        with TestClient(app) as client:
            wait_ready(app)
            key = make_key(app, ["inference"])
            token = client.post("/v1/auth/token", json={"grant_type": "api_key", "api_key": key}).json()
            loop = asyncio.new_event_loop()
            try:
                results = {
                    "api_key_cached": loop.run_until_complete(measure(app, f"Bearer {key}", args.iterations)),
                    "jwt": loop.run_until_complete(measure(app, f"Bearer {token['access_token']}", args.iterations)),
                }
            finally:
                loop.close()
    for name, r in results.items():
        print(f"{name:15s} p50 {r['p50_us']:8.1f} us   p99 {r['p99_us']:8.1f} us")
    out = {
        "benchmark": "auth",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "host": socket.gethostname(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "cpu": platform.processor(),
        },
        "results": results,
        "target": "api_key_cached p50 < 100 us",
        "note": "includes header parsing, cache freshness check, HMAC-SHA256, permission check, audit enqueue",
    }
    path = REPO / "bench" / "results" / f"auth-{socket.gethostname()}-{datetime.now(UTC):%Y%m%d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
