"""Client addresses come from trusted proxies only: forged forwarding headers change neither the audit nor
the login throttle; behind a configured proxy the right-most untrusted hop is the client, and the audit
records both it and the TCP peer."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from starlette.datastructures import Headers
from starlette.testclient import TestClient

from server.audit.models import AuditEvent
from server.identity.clients import ProxyTrust
from server.identity.models import AuthFailure
from server.settings import load_settings
from tests.unit.conftest import CHEAP_HASHER, build_app, wait_ready
from tests.unit.tenancy import add_org, add_user

PASSWORD = "saffron lighthouse 77 harbour"


def resolve(trust: ProxyTrust, peer: str, *headers: tuple[str, str]) -> tuple[str | None, str | None]:
    address = trust.resolve(peer, Headers(raw=[(k.encode(), v.encode()) for k, v in headers]))
    return (None, None) if address is None else (str(address), address.peer)


def test_forwarding_headers_are_ignored_without_trusted_proxies():
    trust = ProxyTrust([])
    assert resolve(trust, "203.0.113.9", ("x-forwarded-for", "1.2.3.4")) == ("203.0.113.9", "203.0.113.9")
    assert resolve(trust, "203.0.113.9", ("forwarded", "for=1.2.3.4")) == ("203.0.113.9", "203.0.113.9")


def test_the_rightmost_untrusted_hop_is_the_client():
    trust = ProxyTrust(["10.0.0.0/8", "2001:db8:1::/48"])
    xff = ("x-forwarded-for", "6.6.6.6, 198.51.100.7")
    assert resolve(trust, "10.0.0.5", xff) == ("198.51.100.7", "10.0.0.5")
    # Two proxies: both trusted hops are skipped, whatever the client wrote to the left is ignored.
    assert resolve(trust, "10.0.0.5", ("x-forwarded-for", "spoofed, 198.51.100.7, 10.1.2.3")) == (
        "198.51.100.7",
        "10.0.0.5",
    )
    # Several header lines are one list, in order.
    lines = [("x-forwarded-for", "6.6.6.6"), ("x-forwarded-for", "198.51.100.8:4431")]
    assert resolve(trust, "10.0.0.5", *lines) == ("198.51.100.8", "10.0.0.5")
    # Every hop trusted: the left-most one; no header: the proxy itself.
    assert resolve(trust, "10.0.0.5", ("x-forwarded-for", "10.9.9.9, 10.1.1.1")) == ("10.9.9.9", "10.0.0.5")
    assert resolve(trust, "10.0.0.5") == ("10.0.0.5", "10.0.0.5")
    # Garbage where a trusted proxy should have written stops at the nearest trusted hop.
    assert resolve(trust, "10.0.0.5", ("x-forwarded-for", "198.51.100.7, not-an-ip")) == ("10.0.0.5", "10.0.0.5")
    # An untrusted peer's header is never read.
    assert resolve(trust, "192.0.2.1", xff) == ("192.0.2.1", "192.0.2.1")
    assert resolve(trust, "2001:db8:1::9", ("x-forwarded-for", "[2001:db8:2::5]:443")) == (
        "2001:db8:2::5",
        "2001:db8:1::9",
    )


def test_only_the_configured_header_counts():
    forwarded = ProxyTrust(["10.0.0.0/8"], header="forwarded")
    header = ("forwarded", 'for=6.6.6.6;proto=http, for="[2001:db8:cafe::17]:4711";by=10.0.0.5')
    assert resolve(forwarded, "10.0.0.5", header) == ("2001:db8:cafe::17", "10.0.0.5")
    assert resolve(forwarded, "10.0.0.5", ("x-forwarded-for", "198.51.100.7")) == ("10.0.0.5", "10.0.0.5")
    assert resolve(forwarded, "10.0.0.5", ("forwarded", "for=unknown")) == ("10.0.0.5", "10.0.0.5")
    xff = ProxyTrust(["10.0.0.0/8"])
    assert resolve(xff, "10.0.0.5", ("forwarded", "for=198.51.100.7")) == ("10.0.0.5", "10.0.0.5")


def test_settings_refuse_a_proxy_that_is_not_an_address(tmp_path):
    with pytest.raises(ValueError, match="trusted_proxies"):
        load_settings(data_dir=tmp_path, network={"trusted_proxies": ["proxy.internal"]})


def _app(tmp_path, peer: str, **network):
    app = build_app(load_settings(data_dir=tmp_path, engine="fake", network=network))
    return app, TestClient(app, client=(peer, 40000))


def _fail_login(client, email: str, forwarded: str | None = None) -> int:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    body = {"grant_type": "password", "email": email, "password": "not the password at all"}
    return client.post("/v1/auth/token", json=body, headers=headers).status_code


def test_a_forged_forwarded_for_changes_neither_audit_nor_throttle(tmp_path):
    app, client = _app(tmp_path, "203.0.113.10")
    with client:
        wait_ready(app)
        # Ten failures, each claiming another address: all count against the real one.
        statuses = [_fail_login(client, f"v{i}@example.com", f"198.51.100.{i}") for i in range(10)]
        assert statuses == [401] * 10
        assert _fail_login(client, "fresh@example.com", "192.0.2.99") == 429
        app.state.audit_sink.flush(failures=True)
        with app.state.db.session() as s:
            rows = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "auth.login")))
            subjects = set(s.scalars(select(AuthFailure.subject).where(AuthFailure.subject.startswith("addr:"))))
        assert rows and {(r.client_addr, r.peer_addr) for r in rows} == {("203.0.113.10", "203.0.113.10")}
        assert sum(r.details["count"] for r in rows) == 11
        assert subjects == {"addr:203.0.113.10"}


def test_behind_a_trusted_proxy_the_audit_records_client_and_peer(tmp_path):
    app, client = _app(tmp_path, "10.0.0.2", trusted_proxies=["10.0.0.0/24"])
    with client:
        wait_ready(app)
        org = add_org(app, "proxied")
        add_user(app, org, "pat@example.com", ["developer"], password_hash=CHEAP_HASHER.hash(PASSWORD))
        ok = client.post(
            "/v1/auth/token",
            json={"grant_type": "password", "email": "pat@example.com", "password": PASSWORD},
            headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.23"},
        )
        assert ok.status_code == 200, ok.text
        token = ok.json()["access_token"]
        client.get("/v1/admin/users", headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": "198.51.100.24"})
        assert _fail_login(client, "pat@example.com", "198.51.100.25") == 401
        app.state.audit_sink.flush(failures=True)
        with app.state.db.session() as s:
            seen = {
                (e.action, e.outcome): (e.client_addr, e.peer_addr)
                for e in s.scalars(select(AuditEvent).where(AuditEvent.client_addr.is_not(None)))
            }
            subjects = set(s.scalars(select(AuthFailure.subject).where(AuthFailure.subject.startswith("addr:"))))
    assert seen[("auth.login", "success")] == ("198.51.100.23", "10.0.0.2")
    assert seen[("authz", "denied")] == ("198.51.100.24", "10.0.0.2")
    assert seen[("auth.login", "failure")] == ("198.51.100.25", "10.0.0.2")
    assert subjects == {"addr:198.51.100.25"}
