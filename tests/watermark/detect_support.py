"""Shared pieces of the detection API tests: an app with a controllable clock, tenants and credentials,
and KGW-watermarked texts the byte-level fake tokenizer round-trips (ids 1..128 are ASCII bytes)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from starlette.testclient import TestClient

from kernels.watermark import kgw_green
from kernels.watermark_params import Scheme
from server.audit.models import AuditEvent
from server.audit.service import Actor
from server.identity import service
from server.identity.apikeys import create_key
from server.identity.models import Organization
from server.watermark.detect_guard import DetectGuard
from server.watermark.detector import detect
from server.watermark.models import ACTIVE, WatermarkKey
from server.watermark.routes import detect_guard
from server.watermark.types import KeyMaterial
from tests.watermark.conftest import MODEL, fake_app

ASCII = list(range(1, 129))  # the fake tokenizer's ids of the bytes 0..127: any sequence of them is a str
_emails = itertools.count()


def as_text(token_ids: list[int]) -> str:
    return "".join(chr(t - 1) for t in token_ids)


class Clock:
    """A settable clock for budgets, suspensions and the probe window; starts tomorrow at 01:00 UTC, so the
    memory limit store (which never lets time run backwards) follows it."""

    def __init__(self) -> None:
        self.now = (time.time() // 86_400 + 1) * 86_400 + 3_600

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Detect:
    """A running app, its clock and helpers for callers of `POST /v1/watermark/detect`."""

    client: TestClient
    clock: Clock

    @property
    def app(self) -> Any:
        return self.client.app

    def default_key(self) -> KeyMaterial:
        return self.app.state.watermark_keys.ensure_default_key()

    def pin_default_key(self, key: bytes) -> KeyMaterial:
        """Replace the deployment key's random bytes with `key` (same scheme and parameters), so that a
        test's outcome does not depend on the key drawn at start."""
        keys = self.app.state.watermark_keys
        current = keys.ensure_default_key()
        key_id = "wk_" + key.hex()[:12]
        with self.app.state.db.session() as session:
            row = session.get(WatermarkKey, current.key_id)
            scheme, params = row.scheme, dict(row.params)
            session.delete(row)
            session.flush()
            sealed = self.app.state.keyring.box.encrypt(key, f"watermark:{key_id}")
            session.add(WatermarkKey(key_id=key_id, scheme=scheme, params=params, key_encrypted=sealed, status=ACTIVE))
        keys.invalidate()
        return keys.active_key_for(None)

    def user(self, org: str | None = None, roles: tuple[str, ...] = ("developer",)) -> tuple[str, str]:
        """(org id, user id): a new user in the named organization (created if needed), or the operator's."""
        with self.app.state.db.session() as session:
            if org is None:
                operator = service.operator_account(session)
                return operator.org_id, operator.id
            found = session.query(Organization).filter(Organization.name == org).all()
            org_id = found[0].id if found else service.create_org(session, Actor.system(), org).id
            user = service.create_user(
                session, Actor.system(), org_id=org_id, email=f"u{next(_emails)}@example.com", roles=list(roles)
            )
            return org_id, user.id

    def key(self, who: tuple[str, str], scopes: tuple[str, ...] = ("watermark:detect",)) -> dict[str, str]:
        """Authorization headers of a new API key of `who`."""
        with self.app.state.db.session() as session:
            _, plaintext = create_key(
                session, self.app.state.keyring.mac, org_id=who[0], user_id=who[1], name="t", scopes=list(scopes)
            )
        return {"Authorization": f"Bearer {plaintext}"}

    def token(self, who: tuple[str, str], *, mfa: bool) -> dict[str, str]:
        """Authorization headers of a token of `who` with every scope, with or without a fresh second factor."""
        amr = ["pwd", "otp"] if mfa else ["pwd"]
        token, _ = self.app.state.tokens.issue(
            sub=who[1], org=who[0], scopes=["*"], amr=amr, auth_time=int(time.time())
        )
        return {"Authorization": f"Bearer {token}"}

    def post(self, headers: dict[str, str], *, text: str | None = None, token_ids: list[int] | None = None) -> Any:
        body: dict[str, Any] = {"model": MODEL}
        if text is not None:
            body["text"] = text
        if token_ids is not None:
            body["token_ids"] = token_ids
        return self.client.post("/v1/watermark/detect", json=body, headers=headers)

    def audit(self, action: str) -> list[AuditEvent]:
        self.app.state.audit_sink.flush()
        with self.app.state.db.session() as session:
            rows = session.query(AuditEvent).filter(AuditEvent.action == action).order_by(AuditEvent.id).all()
            session.expunge_all()
            return rows


@contextmanager
def detect_app(tmp_path: Any, **watermark: Any) -> Iterator[Detect]:
    """The app over the fake engine, a kgw-selfhash deployment key, and a detect guard on `Clock`."""
    app = fake_app(tmp_path, watermark={"scheme": "kgw-selfhash", **watermark})
    clock = Clock()
    with TestClient(app) as client:
        deadline = time.time() + 10
        while not app.state.hub.ready() and time.time() < deadline:
            time.sleep(0.01)
        built = detect_guard(app)
        app.state.watermark_detect_guard = DetectGuard(built.store, built.settings, app.state.audit_sink, clock=clock)
        yield Detect(client, clock)


def watermarked(key: KeyMaterial, length: int, *, seed: int, delta: float = 2.0, spread: float = 1.0) -> list[int]:
    """`length` ASCII tokens sampled from random logits with KGW selfhash's bias under `key` (the detector's
    view of the green lists, `kgw_green`), after a random 4-token start."""
    gen = torch.Generator().manual_seed(seed)
    vocab = torch.tensor(ASCII)
    tokens = [ASCII[int(i)] for i in torch.randint(0, len(ASCII), (4,), generator=gen)]
    for _ in range(length):
        green = kgw_green(key.key, [tokens[-4:]], vocab[None, :], Scheme.KGW_SELFHASH, key.gamma)[0]
        logits = torch.randn(len(ASCII), generator=gen) * spread + delta * green.double()
        tokens.append(ASCII[int(torch.multinomial(torch.softmax(logits, 0), 1, generator=gen))])
    return tokens


def colour(key: KeyMaterial, context: list[int], token: int) -> bool:
    """Ground truth: is `token` green after `context` (its last 4 tokens) under `key`? Asked of the real
    detector on the 5-token text (one scored position)."""
    result = detect([*context[-4:], token], [key], threshold=1.0, min_tokens=1)
    return result.green_fraction == 1.0
