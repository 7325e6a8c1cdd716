"""Unauthenticated traffic cannot grow the database faster than the configured bound, and its failures still
reach the audit (aggregated) and the security-event hook."""

from __future__ import annotations

import json
import math
import time

from sqlalchemy import select, text
from starlette.testclient import TestClient

from server.audit.failures import ACTIONS, FIELD_CHARS, MAX_ROW_BYTES, OVERFLOW, FailureTally
from server.audit.models import AuditEvent
from server.audit.service import Actor
from server.settings import load_settings
from tests.unit.conftest import build_app, wait_ready
from tests.unit.tenancy import add_org, add_user, step_up

BOGUS_KEY = "sk-aaaaaaaaaaaa-" + "b" * 43
LONG_PATH = "/v1/models/" + "x" * 60_000
INTERVAL, MAX_ROWS = 0.5, 3
PAGE_SLACK = 128 * 1024  # SQLite allocates whole pages per table and index


def _row_bytes(row: dict) -> int:
    return len(json.dumps({k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}).encode())


def test_a_tally_keeps_max_rows_plus_one_overflow_per_action_and_truncates_everything():
    tally = FailureTally(max_rows=5)
    for i in range(1000):
        actor = Actor(type="anonymous", client_addr=f"203.0.{i // 256}.{i % 256}" + "x" * 80, peer_addr="10.0.0.1")
        tally.add(actor, "authn", "invalid_api_key" + "!" * 100, path="/" + "p" * 70_000 + str(i), email="e" * 400)
    for i in range(10):
        tally.add(Actor(type="anonymous", client_addr=f"192.0.2.{i}"), "auth.login", "bad_credentials", email="x")
    rows = tally.drain()
    assert len(rows) == 5 + len(ACTIONS) and sum(r["details"]["count"] for r in rows) == 1010
    overflow = {r["action"]: r["details"]["count"] for r in rows if r["details"]["reason"] == OVERFLOW}
    assert overflow == {"authn": 995, "auth.login": 10}
    for row in rows:
        assert _row_bytes(row) <= MAX_ROW_BYTES
        assert len(row["client_addr"] or "") <= 64
        assert all(len(v) <= FIELD_CHARS for values in row["details"]["samples"].values() for v in values)
    assert tally.drain() == []  # the next interval starts empty


def _db_bytes(app) -> int:
    with app.state.db.session() as s:
        s.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        pages = s.execute(text("PRAGMA page_count")).scalar_one()
        size = s.execute(text("PRAGMA page_size")).scalar_one()
    return int(pages) * int(size)


def test_a_flood_of_failed_authentications_grows_the_database_within_the_bound(tmp_path):
    settings = load_settings(
        data_dir=tmp_path,
        engine="fake",
        network={"trusted_proxies": ["127.0.0.1"]},
        audit={"failure_interval_seconds": INTERVAL, "failure_max_rows": MAX_ROWS},
    )
    app = build_app(settings)
    published: list[dict] = []
    app.state.audit_sink.subscribe_security_events(published.extend)
    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        wait_ready(app)
        app.state.audit_sink.flush(failures=True)
        before = _db_bytes(app)
        started = time.monotonic()
        statuses = set()
        for i in range(300):  # the tester's flood: a bogus key and a 60 KB path, 300 times
            resp = client.get(LONG_PATH, headers={"Authorization": f"Bearer {BOGUS_KEY}"})
            statuses.add(resp.status_code)
        for i in range(200):  # and without a key, from 200 different (forwarded) addresses
            headers = {"X-Forwarded-For": f"198.51.{i // 250}.{i % 250}"}
            statuses.add(client.get(LONG_PATH, headers=headers).status_code)
        for i in range(60):  # failed logins with long made-up emails
            body = {"grant_type": "password", "email": f"{i}{'m' * 300}@x.example", "password": "no no no no no 1"}
            statuses.add(client.post("/v1/auth/token", json=body).status_code)
        elapsed = time.monotonic() - started
        app.state.audit_sink.flush(failures=True)
        grown = _db_bytes(app) - before
        with app.state.db.session() as s:
            rows = list(s.scalars(select(AuditEvent).where(AuditEvent.outcome == "failure")))
        flushes = math.ceil(elapsed / INTERVAL) + 2
        bound = flushes * (MAX_ROWS + len(ACTIONS)) * MAX_ROW_BYTES + PAGE_SLACK
        print(f"\n560 failures in {elapsed:.1f} s: {len(rows)} audit rows, database grew {grown} B (bound {bound} B)")
        assert statuses <= {401, 429}
        assert grown <= bound and grown < 560 * 60_000 / 100  # two orders of magnitude under one row each
        assert len(rows) <= flushes * (MAX_ROWS + len(ACTIONS))
        assert sum(r.details["count"] for r in rows) == 560  # every failure counted
        assert {r.details["reason"] for r in rows} >= {"invalid_api_key", "missing_credentials"}
        assert published and sum(r["details"]["count"] for r in published) == 560

        # The installation's owner reads them through the audit API.
        org = add_org(app, "root")
        owner = add_user(app, org, "owner@install.example", ["owner"])
        listed = client.get(
            "/v1/admin/audit", params={"action": "authn", "limit": 1000}, headers=step_up(app, owner, org)
        )
        assert listed.status_code == 200
        counted = sum(e["details"]["count"] for e in listed.json()["data"] if e["outcome"] == "failure")
        assert counted == 500
