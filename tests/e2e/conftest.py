"""One real server per test session: real vLLM CPU engine, real default model, real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
START_TIMEOUT_S = 900


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    data_dir: Path
    config: Path
    key: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def cli(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "server", "--config", str(self.config), *argv],
            cwd=REPO,
            env=server_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def create_key(self, scopes: str) -> str:
        out = self.cli("keys", "create", "--scopes", scopes, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["key"]

    def exempt_key(self, scopes: str = "inference") -> str:
        """A new key exempted from watermarking (the model's unaltered answers), once the server applies it."""
        out = self.cli("keys", "create", "--scopes", scopes, "--json")
        assert out.returncode == 0, out.stderr
        created = json.loads(out.stdout)
        done = self.cli("watermark", "exempt", created["id"], "--reason", "e2e: unwatermarked baseline")
        assert done.returncode == 0, done.stderr
        self.wait_for_watermark(created["key"], "off; reason=exempt")
        return created["key"]

    def wait_for_watermark(self, key: str, expected: str, timeout: float = 30.0) -> None:
        """Poll one-token answers until X-Watermark is `expected` (the server re-reads keys and exemptions
        every `watermark.cache_seconds`)."""
        deadline, seen = time.monotonic() + timeout, None
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        while time.monotonic() < deadline:
            resp = httpx.post(
                f"{self.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60
            )
            assert resp.status_code == 200, resp.text
            seen = resp.headers.get("x-watermark")
            if seen == expected:
                return
            time.sleep(0.3)
        pytest.fail(f"X-Watermark stayed {seen!r}, expected {expected!r}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=10).text
        for line in text.splitlines():
            named = line.startswith(name + "{") or line.startswith(name + " ")
            if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVER_")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def start_server(data_dir: Path, model_dir: Path, extra_toml: str = "") -> LiveServer:
    port = free_port()
    config = data_dir / "server.toml"
    config.write_text(f"""
data_dir = "{data_dir}"
port = {port}
shutdown_grace_seconds = 5

[[pools]]
name = "cpu"
device = "cpu"
kv_cache_gib = 1

[[models]]
name = "{MODEL}"
path = "{model_dir}"
pool = "cpu"
max_model_len = 2048

[watermark]
cache_seconds = 1
{extra_toml}
""")
    log_path = data_dir / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--config", str(config), "serve"],
        cwd=REPO,
        env=server_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = LiveServer(
        url=f"http://127.0.0.1:{port}", process=proc, log_path=log_path, data_dir=data_dir, config=config
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            resp = httpx.get(f"{server.url}/readyz", timeout=5)
            if resp.status_code == 200:
                server.key = server.create_key("inference,metrics:read")
                return server
            if resp.json().get("status") == "failed":
                stop_server(server)
                pytest.fail(f"server failed to start: {resp.text}\n{server.log_tail()}")
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(server)
    pytest.fail(f"server not ready after {START_TIMEOUT_S}s:\n{server.log_tail()}")


def stop_server(server: LiveServer) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def live_server(tmp_path_factory, default_model_dir) -> LiveServer:
    server = start_server(tmp_path_factory.mktemp("e2e"), default_model_dir)
    yield server
    assert stop_server(server) == 0, f"unclean shutdown:\n{server.log_tail()}"


@pytest.fixture(scope="session")
def client(live_server):
    from openai import OpenAI

    with OpenAI(base_url=f"{live_server.url}/v1", api_key=live_server.key, max_retries=0, timeout=120) as c:
        yield c
