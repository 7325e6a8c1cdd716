"""Admission control cost: per request (p50/p99 µs) for the memory and Redis stores, and the full request
path's throughput with admission against the same path without it, in one run.

The full path runs in-process (httpx's ASGI transport into the real app, fake engine, no network), so the
difference is the admission step itself, not socket noise. "Without admission" swaps the app's gatekeeper
for a pass-through in this script only; the server has no switch that turns admission off.

    .venv/bin/python bench/admission.py [--requests 2000] [--redis redis://127.0.0.1:6379/15]

Writes bench/results/admission-<host>-<date>.json. Targets: memory < 200 µs p50, Redis < 1 ms p50.
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
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from server.identity import service  # noqa: E402
from server.policy.models import LimitOverride  # noqa: E402
from server.settings import load_settings  # noqa: E402
from tests.unit.conftest import MODEL, build_app, make_key, wait_ready  # noqa: E402

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


class _NoAdmission:
    headers: dict[str, str] = {}

    async def finish(self, used_tokens: int | None) -> None:
        return None


class PassThrough:
    """Stands in for the gatekeeper: admits everything, records nothing."""

    async def admit(self, *args: object, **kwargs: object) -> _NoAdmission:
        return _NoAdmission()


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def admission_cost(app, key: str, n: int) -> dict[str, float]:
    """admit + finish through the app's own Gatekeeper, as the endpoints call it."""
    principal = await app.state.authenticator.authenticate(_request(app, key))
    gatekeeper = app.state.gatekeeper
    samples = []
    for _ in range(n + 200):
        started = time.perf_counter_ns()
        admission = await gatekeeper.admit(
            principal, pool="cpu", request_id=uuid.uuid4().hex, tokens=20, client_addr="127.0.0.1"
        )
        await admission.finish(12)
        samples.append((time.perf_counter_ns() - started) / 1000)
    samples = samples[200:]
    return {"p50_us": statistics.median(samples), "p99_us": pct(samples, 0.99)}


def _request(app, key: str):
    from starlette.requests import Request

    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/v1/chat/completions",
            "app": app,
            "headers": [(b"authorization", f"Bearer {key}".encode())],
            "client": ("127.0.0.1", 1),
            "query_string": b"",
        }
    )


async def throughput(app, key: str, n: int, concurrency: int = 8) -> float:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://bench", headers={"Authorization": f"Bearer {key}"}
    ) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with semaphore:
                resp = await client.post("/v1/chat/completions", json=BODY)
                assert resp.status_code == 200, resp.text

        await asyncio.gather(*(one() for _ in range(100)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.perf_counter() - started)


def run_backend(store_url: str, n: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(
            data_dir=Path(tmp), engine="fake", admission={"store_url": store_url, "new_key_age_seconds": 0}
        )
        app = build_app(settings)
        with TestClient(app) as client:
            wait_ready(app)
            huge = {"rpm": 10**9, "tpm": 10**12, "tpd": 10**13, "concurrent": 10**6}
            key = make_key(app, ["inference"], limits=huge)
            with app.state.db.session() as session:  # lift the role defaults: this measures cost, not limits
                op = service.operator_account(session)
                session.add(LimitOverride(scope=f"user:{op.id}", org_id=op.org_id, limits=huge))
            app.state.gatekeeper.refresh()
            run = client.portal.call  # the app's own event loop (where its store connections live)
            cost = run(admission_cost, app, key, n)
            real = app.state.chat.gatekeeper
            with_admission = run(throughput, app, key, n)
            app.state.chat.gatekeeper = PassThrough()
            without = run(throughput, app, key, n)
            app.state.chat.gatekeeper = real
            with_again = run(throughput, app, key, n)
    best_with = max(with_admission, with_again)
    return {
        "store": store_url.split("://")[0],
        "admission": cost,
        "rps_with_admission": best_with,
        "rps_without_admission": without,
        "throughput_ratio": best_with / without,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()
    results = [run_backend("memory://", args.requests), run_backend(args.redis, args.requests)]
    for r in results:
        a = r["admission"]
        print(
            f"{r['store']:7s} admission p50 {a['p50_us']:7.1f} us  p99 {a['p99_us']:8.1f} us   full path "
            f"{r['rps_with_admission']:7.1f} req/s vs {r['rps_without_admission']:7.1f} without "
            f"(ratio {r['throughput_ratio']:.3f})"
        )
    out = {
        "benchmark": "admission",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"host": socket.gethostname(), "cores": os.cpu_count(), "python": platform.python_version()},
        "results": results,
        "targets": {"memory_p50_us": 200, "redis_p50_us": 1000},
        "note": "full path = in-process ASGI, fake engine (8 tokens), 3 scopes (key, user, org), concurrency 8",
    }
    path = REPO / "bench" / "results" / f"admission-{socket.gethostname()}-{datetime.now(UTC):%Y%m%d}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
