"""Promote version 2, then roll back to version 1, while answers stream continuously: nothing fails, and
each answer names the version that was active when it was admitted (real server, real vLLM engines)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.e2e.conftest import MODEL, LiveServer

pytestmark = pytest.mark.e2e

SWAP_TIMEOUT_S = 300
CLIENTS = 3


@dataclass
class Answer:
    started: float
    ended: float = 0.0
    header_version: str = ""
    fingerprints: set[str] = field(default_factory=set)
    finish: str | None = None
    error: str | None = None


def _served(server: LiveServer) -> str:
    models = httpx.get(f"{server.url}/readyz", timeout=10).json()["models"]
    return next(m["version"] for m in models if m["model"] == MODEL)


def _wait_served(server: LiveServer, version: str) -> float:
    deadline = time.monotonic() + SWAP_TIMEOUT_S
    while time.monotonic() < deadline:
        if _served(server) == version:
            return time.monotonic()
        time.sleep(0.2)
    pytest.fail(f"{version} was not served after {SWAP_TIMEOUT_S}s:\n{server.log_tail()}")


def _stream_forever(server: LiveServer, stop: threading.Event, out: list[Answer], i: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Tell me a fact about the number {i}."}],
        "max_tokens": 24,
        "temperature": 1.0,
        "stream": True,
    }
    with httpx.Client(timeout=120, headers=server.headers) as client:
        while not stop.is_set():
            answer = Answer(started=time.monotonic())
            out.append(answer)
            try:
                with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp:
                    if resp.status_code != 200:
                        answer.error = f"{resp.status_code}: {resp.read()[:300]!r}"
                        continue
                    answer.header_version = resp.headers["x-model-version"]
                    for line in resp.iter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                answer.error = json.dumps(chunk)[:300]
                            answer.fingerprints.add(chunk["system_fingerprint"])
                            for choice in chunk.get("choices", []):
                                answer.finish = choice.get("finish_reason") or answer.finish
            except httpx.HTTPError as exc:
                answer.error = f"{type(exc).__name__}: {exc}"
            finally:
                answer.ended = time.monotonic()


def test_promote_and_rollback_under_streaming_load(live_server, default_model_dir, tmp_path):
    s = live_server
    v1 = _served(s)
    # Version 2: the same weights with one more (inert) field in config.json, so a new digest.
    folder = tmp_path / "v2"
    shutil.copytree(default_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "e2e_release_note": "version 2"}, indent=2))
    imported = s.cli("models", "import", MODEL, str(folder), "--json")
    assert imported.returncode == 0, imported.stderr
    v2 = json.loads(imported.stdout)["version"]
    verified = s.cli("models", "verify", MODEL, "--version", v2)
    assert verified.returncode == 0, verified.stderr
    evaluated = s.cli("models", "evaluate", MODEL, v2, "--json")  # runs the pre-promotion suite against v1
    assert evaluated.returncode == 0, evaluated.stderr + evaluated.stdout

    stop, answers = threading.Event(), [[] for _ in range(CLIENTS)]
    threads = [threading.Thread(target=_stream_forever, args=(s, stop, answers[i], i)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        promote_at = time.monotonic()
        promoted = s.cli("models", "promote", MODEL, v2)
        assert promoted.returncode == 0, promoted.stderr
        v2_live = _wait_served(s, v2)
        time.sleep(4)
        rollback_at = time.monotonic()
        rolled = s.cli("models", "rollback", MODEL)
        assert rolled.returncode == 0, rolled.stderr
        v1_live = _wait_served(s, v1)
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)

    done = [a for per_client in answers for a in per_client]
    failed = [a for a in done if a.error or a.finish is None]
    assert not failed, failed[:5]
    assert len({fp for a in done for fp in a.fingerprints}) == 2
    for a in done:
        assert len(a.fingerprints) == 1, a  # one version per answer, never a mix
        assert next(iter(a.fingerprints)).startswith(f"{MODEL}@{a.header_version}+")
        if a.started < promote_at or a.started > v1_live:
            assert a.header_version == v1, a
        elif v2_live < a.started < rollback_at:
            assert a.header_version == v2, a
    assert sum(a.header_version == v2 for a in done) >= 1
    assert sum(a.started > v1_live for a in done) >= 1
    ready = httpx.get(f"{s.url}/readyz", timeout=10).json()
    assert ready["status"] == "ready" and "swap_errors" not in ready
