"""Several server processes sharing one PostgreSQL (fake engine: this is about identity, not inference)."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO, free_port, server_env
from tests.storage_backends import fresh_postgres_database, postgres_available

pytestmark = pytest.mark.postgres


def _config(tmp: Path, url: str, port: int, secret: str) -> Path:
    path = tmp / f"replica-{port}.toml"
    path.write_text(f"""
data_dir = "{tmp}"
database_url = "{url}"
port = {port}
engine = "fake"
log_level = "warning"
[auth]
secret_key = "{secret}"
""")
    return path


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    if not postgres_available():
        pytest.fail("PostgreSQL on 127.0.0.1:5432 is not reachable; .ci/run starts it")
    tmp = tmp_path_factory.mktemp("replicas")
    secret = secrets.token_urlsafe(48)
    with fresh_postgres_database() as url:
        procs, urls, configs = [], [], []
        for _ in range(2):
            port = free_port()
            config = _config(tmp, url, port, secret)
            log = open(tmp / f"{port}.log", "wb")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "server", "--config", str(config), "serve"],
                    cwd=REPO,
                    env=server_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
            configs.append(config)
        try:
            for u, p in zip(urls, procs, strict=True):
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    assert p.poll() is None, (tmp / f"{u.rsplit(':', 1)[1]}.log").read_text()[-3000:]
                    try:
                        if httpx.get(f"{u}/readyz", timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.2)
                else:
                    pytest.fail(f"{u} not ready")
            yield urls, configs
        finally:
            for p in procs:
                p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def _cli_key(config: Path, scopes: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "server", "--config", str(config), "keys", "create", "--scopes", scopes, "--json"],
        cwd=REPO,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_revocation_through_one_replica_reaches_the_other_within_a_second(replicas):
    (a, b), (config, _) = replicas
    admin = _cli_key(config, "admin")["key"]
    victim = _cli_key(config, "inference")
    auth = {"Authorization": f"Bearer {victim['key']}"}
    for url in (a, b):  # both replicas accept (and cache) the key
        assert httpx.get(f"{url}/v1/models", headers=auth).status_code == 200
    resp = httpx.post(f"{a}/v1/admin/keys/{victim['id']}/revoke", headers={"Authorization": f"Bearer {admin}"})
    assert resp.status_code == 200, resp.text
    revoked_at = time.monotonic()
    while True:
        status = httpx.get(f"{b}/v1/models", headers=auth).status_code
        elapsed = time.monotonic() - revoked_at
        if status == 401:
            break
        assert status == 200 and elapsed < 5
        time.sleep(0.01)
    print(f"\nrevocation visible on the other replica after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    assert httpx.get(f"{a}/v1/models", headers=auth).status_code == 401


def test_tokens_from_one_replica_verify_on_the_other(replicas):
    (a, b), (config, _) = replicas
    key = _cli_key(config, "inference")["key"]
    token = httpx.post(f"{a}/v1/auth/token", json={"grant_type": "api_key", "api_key": key}).json()
    assert token["token_type"] == "Bearer" and token["expires_in"] <= 900
    resp = httpx.get(f"{b}/v1/models", headers={"Authorization": f"Bearer {token['access_token']}"})
    assert resp.status_code == 200
