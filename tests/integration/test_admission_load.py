"""Admission under load, across processes, and with Redis failing (real uvicorn processes, fake engine)."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import shutil
import subprocess
import time

import httpx
import pyotp
import pytest

from tests.e2e.conftest import free_port
from tests.integration.servers import Proc, start, stop

MODEL = "SmolLM2-135M-Instruct"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 60, "stream": True}


def _admin_token(server: Proc) -> str:
    return server.key("admin")["key"]


def _owner_token(server: Proc) -> str:
    """Creating users with roles is a role assignment (`roles:write` with step-up): the bootstrapped owner
    logs in with password and TOTP."""
    out = server.cli("admin", "bootstrap", "--email", "owner@load.example", "--json")
    assert out.returncode == 0, out.stderr
    boot = json.loads(out.stdout)
    body = {"grant_type": "password", "email": boot["email"], "password": boot["password"]}
    body["totp_code"] = pyotp.parse_uri(boot["totp_provisioning_uri"]).now()
    resp = httpx.post(f"{server.url}/v1/auth/token", json=body, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["access_token"]


async def _make_keys(server: Proc, n: int) -> list[str]:
    admin = {"Authorization": f"Bearer {_owner_token(server)}"}
    async with httpx.AsyncClient(base_url=server.url, headers=admin, timeout=30) as c:
        keys = []
        for i in range(n):
            user = await c.post("/v1/admin/users", json={"email": f"u{i}@load.example", "roles": ["developer"]})
            assert user.status_code == 201, user.text
            key = await c.post("/v1/admin/keys", json={"user_id": user.json()["id"], "scopes": ["inference"]})
            assert key.status_code == 201, key.text
            keys.append(key.json()["key"])
        return keys


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def test_200_streams_from_20_keys_with_disconnects_never_exceed_caps(tmp):
    cap = 3
    server = start(
        tmp,
        f"""
data_dir = "{tmp}"
engine = "fake"
fake_token_delay_seconds = 0.01
log_level = "warning"
[admission]
new_key_age_seconds = 0
[[pools]]
name = "cpu"
max_concurrency = 40
per_key_concurrency = {cap}
queue_length = 400
queue_timeout_seconds = 120
""",
    )
    try:
        keys = asyncio.run(_make_keys(server, 20))
        admin = {"Authorization": f"Bearer {_admin_token(server)}"}
        peak: dict[str, int] = {}
        statuses: list[int] = []

        async def sampler(stop_event: asyncio.Event, client: httpx.AsyncClient) -> int:
            samples = 0
            while not stop_event.is_set():
                pool = (await client.get("/v1/admin/pools", headers=admin)).json()["data"][0]["admission"]
                for key, n in pool["in_flight_by_key"].items():
                    peak[key] = max(peak.get(key, 0), n)
                assert pool["in_flight"] <= 40
                samples += 1
                await asyncio.sleep(0.02)
            return samples

        async def one(client: httpx.AsyncClient, key: str, disconnect: bool) -> None:
            async with client.stream(
                "POST", "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {key}"}
            ) as resp:
                statuses.append(resp.status_code)
                if resp.status_code != 200:
                    await resp.aread()
                    return
                lines = 0
                stop_at = random.randint(1, 40) if disconnect else None
                async for _ in resp.aiter_lines():
                    lines += 1
                    if stop_at is not None and lines >= stop_at:
                        return  # leaves the stream: the client disconnects mid-response

        async def run() -> int:
            limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, timeout=180, limits=limits) as client:
                stop_event = asyncio.Event()
                sampling = asyncio.create_task(sampler(stop_event, client))
                random.seed(7)
                await asyncio.gather(*(one(client, keys[i % 20], i % 3 == 0) for i in range(200)))
                await asyncio.sleep(0.5)
                stop_event.set()
                return await sampling

        samples = asyncio.run(run())
        assert samples > 10
        assert max(peak.values()) <= cap, peak
        assert 500 not in statuses and statuses.count(200) == 200, sorted(set(statuses))
        final = httpx.get(f"{server.url}/v1/admin/pools", headers=admin).json()["data"][0]["admission"]
        assert final["in_flight"] == 0 and not any(final["in_flight_by_key"].values()) and final["queued"] == 0
        ok = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={**BODY, "stream": False},
            headers={"Authorization": f"Bearer {keys[0]}"},
        )
        assert ok.status_code == 200
    finally:
        assert stop(server) == 0


@pytest.fixture
def private_redis(tmp):
    """A redis-server of our own on a free port, so that a test may kill it."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed; .ci/run expects it")
    port = free_port()

    def launch() -> subprocess.Popen:
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return proc
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    state = {"proc": launch()}

    class Handle:
        url = f"redis://127.0.0.1:{port}/0"

        @staticmethod
        def kill() -> None:
            state["proc"].kill()
            state["proc"].wait()

        @staticmethod
        def restart() -> None:
            state["proc"] = launch()

    yield Handle
    state["proc"].kill()
    state["proc"].wait()


def _redis_servers(tmp, redis_url: str, n: int) -> list[Proc]:
    secret = secrets.token_urlsafe(48)
    common = f"""
data_dir = "{tmp}"
engine = "fake"
log_level = "warning"
[auth]
secret_key = "{secret}"
[admission]
store_url = "{redis_url}"
new_key_age_seconds = 0
"""
    return [start(tmp, common) for _ in range(n)]


def test_two_replicas_share_one_redis_limit(tmp, private_redis):
    servers = _redis_servers(tmp, private_redis.url, 2)
    try:
        key = servers[0].key("inference")
        # Both replicas share the SQLite file; set the key's limit there (the admin API's step-up path is
        # covered by the unit tests) and move the credentials counter so both drop their cached record.
        import sqlite3

        with sqlite3.connect(tmp / "server.db") as db:
            db.execute("UPDATE api_keys SET limits = ? WHERE id = ?", ('{"rpm": 10}', key["id"]))
            db.execute("UPDATE change_counters SET value = value + 1 WHERE name = 'credentials'")

        time.sleep(1.2)  # both replicas drop cached key records within the revocation bound

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {key['key']}"}) as c:
                body = {**BODY, "stream": False, "max_tokens": 5}
                calls = [c.post(f"{servers[i % 2].url}/v1/chat/completions", json=body) for i in range(30)]
                return [r.status_code for r in await asyncio.gather(*calls)]

        statuses = asyncio.run(burst())
        assert statuses.count(200) == 10 and statuses.count(429) == 20, statuses
    finally:
        for s in servers:
            stop(s)


def test_redis_killed_mid_load_fails_closed_then_recovers(tmp, private_redis):
    (server,) = _redis_servers(tmp, private_redis.url, 1)
    try:
        key = server.key("inference")["key"]
        auth = {"Authorization": f"Bearer {key}"}
        body = {**BODY, "stream": False, "max_tokens": 5}
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth).status_code == 200
        private_redis.kill()
        down = [httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth, timeout=30) for _ in range(5)]
        assert {r.status_code for r in down} == {503}
        assert all(r.json()["error"]["code"] == "limiter_unavailable" for r in down)
        assert server.process.poll() is None
        private_redis.restart()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=auth).status_code == 200:
                break
            time.sleep(0.2)
        else:
            pytest.fail("service did not resume after Redis came back")
    finally:
        assert stop(server) == 0
