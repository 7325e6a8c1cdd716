"""Probing detection on `POST /v1/watermark/detect`: near-identical queries are counted per organization
and across organizations, flagged as a security event, and suspend the senders; memory stays bounded."""

from __future__ import annotations

import random

import numpy as np
import pytest

from server.watermark.detect_guard import _Suspensions
from server.watermark.probes import FingerprintKeys, ProbeMemory, fingerprint
from tests.watermark.detect_support import ASCII, as_text, detect_app

THRESHOLD = 5


def _base(seed: int, length: int = 60) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(ASCII) for _ in range(length)]


def _variant(base: list[int], i: int) -> str:
    """`base` with its last token replaced: the boundary prober's query."""
    return as_text([*base[:-1], ASCII[i % len(ASCII)]])


@pytest.fixture
def wm(tmp_path):
    with detect_app(tmp_path, detect_probe_threshold=THRESHOLD, detect_probe_cooldown_seconds=600) as d:
        d.default_key()
        yield d


def test_near_identical_queries_are_flagged_and_suspend_the_user(wm):
    who = wm.user("acme")
    headers = wm.key(who)
    base = _base(1)
    answers = []
    for i in range(THRESHOLD + 1):
        answers.append(wm.post(headers, text=_variant(base, i)))
        wm.clock.advance(5)
    assert [r.status_code for r in answers] == [200] * (THRESHOLD - 1) + [429, 429]
    flagged = answers[THRESHOLD - 1].json()["error"]
    assert flagged["code"] == "detection_suspended" and "probing" in flagged["message"]
    assert int(answers[THRESHOLD - 1].headers["Retry-After"]) == 600

    events = wm.audit("watermark.probe")
    assert len(events) == 1 and events[0].outcome == "flagged" and events[0].org_id == who[0]
    assert events[0].details["near_duplicates"] == THRESHOLD and events[0].details["suspended"] == ["user"]
    assert "text" not in events[0].details

    unrelated = wm.post(wm.key(who), text=as_text(_base(99)))  # a fresh key of the same user
    assert unrelated.status_code == 429 and unrelated.json()["error"]["code"] == "detection_suspended"
    assert wm.post(wm.key(wm.user("acme")), text=as_text(_base(98))).is_success  # a colleague is not suspended

    wm.clock.advance(601)  # the cool-down is over here, but the day's budget was spent in the shared store
    after = wm.post(headers, text=as_text(_base(97)))
    assert after.status_code == 429 and after.json()["error"]["code"] == "insufficient_quota"
    wm.clock.advance(86_400)
    assert wm.post(headers, text=as_text(_base(96))).is_success


def test_exact_repeats_and_unrelated_texts_are_not_probing(wm):
    headers = wm.key(wm.user("acme"))
    for _ in range(2 * THRESHOLD):
        assert wm.post(headers, text=as_text(_base(5))).is_success  # a repeat teaches nothing new
        wm.clock.advance(5)
    for seed in range(10, 10 + 2 * THRESHOLD):
        assert wm.post(headers, text=as_text(_base(seed))).is_success
        wm.clock.advance(5)
    assert wm.audit("watermark.probe") == []


def test_probes_spread_over_users_suspend_the_organization(wm):
    users = [wm.user("acme") for _ in range(THRESHOLD)]
    base = _base(2)
    statuses = [wm.post(wm.key(u), text=_variant(base, i)).status_code for i, u in enumerate(users)]
    assert statuses == [200] * (THRESHOLD - 1) + [429]
    assert wm.audit("watermark.probe")[0].details["suspended"] == ["user", "organization"]
    newcomer = wm.post(wm.key(wm.user("acme")), text=as_text(_base(50)))
    assert newcomer.status_code == 429 and "organization" in newcomer.json()["error"]["message"]
    assert wm.post(wm.key(wm.user("globex")), text=as_text(_base(51))).is_success


def test_probes_spread_over_organizations_are_counted_together(wm):
    base = _base(3)
    statuses = [wm.post(wm.key(wm.user(f"org-{i}")), text=_variant(base, i)).status_code for i in range(THRESHOLD)]
    assert statuses == [200] * (THRESHOLD - 1) + [429]
    event = wm.audit("watermark.probe")[0]
    assert event.details["orgs"] == THRESHOLD and event.details["other_orgs"] == THRESHOLD - 1


def test_another_tenant_cannot_get_an_honest_query_flagged(wm):
    """Seeding variants of a text from one organization (poisoning) counts once for everyone else."""
    base, seeder = _base(6), wm.key(wm.user("mallory-inc"))
    for i in range(THRESHOLD - 1):
        assert wm.post(seeder, text=_variant(base, i)).is_success
    assert wm.post(wm.key(wm.user("acme")), text=_variant(base, 100)).is_success
    assert wm.audit("watermark.probe") == []


def test_old_queries_leave_the_window(tmp_path):
    with detect_app(tmp_path, detect_probe_threshold=3, detect_probe_window_seconds=100) as wm:
        wm.default_key()
        headers, base = wm.key(wm.user("acme")), _base(4)
        for i in range(6):
            assert wm.post(headers, text=_variant(base, i)).is_success
            wm.clock.advance(60)  # at most one earlier near-duplicate is ever inside the window


def test_fingerprints_see_edits_truncations_and_padding_but_not_other_texts():
    keys, memory = FingerprintKeys(), ProbeMemory(0.6, 2, 100.0)
    rng = random.Random(7)
    text = [rng.randrange(50_000) for _ in range(80)]
    memory.observe("o", "u", fingerprint(text, keys), 0.0)
    near = [
        text[:40] + [7] + text[41:],  # one token swapped
        text[:50],  # truncated
        text + [rng.randrange(50_000) for _ in range(40)],  # padded with half as much filler
    ]
    for variant in near:
        fresh = ProbeMemory(0.6, 2, 100.0)
        fresh.keys = keys
        fresh.observe("o", "u", fingerprint(text, keys), 0.0)
        assert fresh.observe("o", "u", fingerprint(variant, keys), 1.0).flagged
    other = [rng.randrange(50_000) for _ in range(80)]
    assert not memory.observe("o", "u", fingerprint(other, keys), 1.0).flagged
    assert not memory.observe("o", "u", fingerprint(text, keys), 2.0).flagged  # an exact repeat


def test_probe_memory_and_suspensions_are_bounded():
    keys, memory = FingerprintKeys(), ProbeMemory(0.6, 3, 1e9, per_org=4, deployment=8, max_orgs=3)
    memory.keys = keys
    rng = random.Random(8)
    for i in range(200):
        fp = fingerprint([rng.randrange(1000) for _ in range(30)], keys)
        memory.observe(f"org-{i % 50}", f"user-{i}", fp, float(i))
    assert memory.orgs_remembered() == 3
    assert all(ring.signatures.shape == (4, 64) for ring in memory._orgs.values())
    assert memory._deployment.signatures.shape == (8, 64) and len(memory._deployment.who) == 8

    suspensions = _Suspensions(capacity=10)
    for i in range(100):
        suspensions.suspend(f"user:{i}", until=1000.0 + i, now=float(i))
    assert len(suspensions) == 10 and suspensions.remaining("user:99", 500.0) == pytest.approx(599.0)


def test_fingerprints_are_keyed_per_process():
    text = list(range(100))
    a, b = fingerprint(text, FingerprintKeys()), fingerprint(text, FingerprintKeys())
    assert not np.array_equal(a.signature, b.signature) and a.digest != b.digest
