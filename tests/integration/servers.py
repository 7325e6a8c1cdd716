"""Real server processes (uvicorn, fake engine) for multi-process tests of the layers above the engine."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO, free_port, server_env


@dataclass
class Proc:
    url: str
    config: Path
    process: subprocess.Popen
    log: Path

    def cli(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "server", "--config", str(self.config), *argv],
            cwd=REPO,
            env=server_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def key(self, scopes: str = "inference") -> dict:
        out = self.cli("keys", "create", "--scopes", scopes, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


def start(tmp: Path, toml: str) -> Proc:
    port = free_port()
    config = tmp / f"server-{port}.toml"
    config.write_text(f"port = {port}\n" + toml)
    log = tmp / f"server-{port}.log"
    handle = open(log, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--config", str(config), "serve"],
        cwd=REPO,
        env=server_env(),
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    server = Proc(f"http://127.0.0.1:{port}", config, proc, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(server)
    pytest.fail(f"server not ready:\n{log.read_text()[-3000:]}")


def stop(server: Proc) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode
