"""`POST /v1/watermark/detect` over the app with the in-process engine: the verdict-only answer, who may
send `token_ids`, the vocabulary check, and budgets per user and organization (never per API key)."""

from __future__ import annotations

import json

import pytest

from server.engine.fake import ByteTokenizer
from server.engine.tokenizer import _config_vocab_size
from server.watermark.verdict import p_value_band, p_value_bands
from tests.watermark.conftest import MODEL
from tests.watermark.detect_support import as_text, detect_app, watermarked

DETECTED = {"detected", "scheme", "key_id", "p_value_below"}
PROSE = "The quick brown fox jumps over the lazy dog while seven wizards quietly hex jumbled boxes of zinc. " * 3


@pytest.fixture
def wm(tmp_path):
    with detect_app(tmp_path, detect_requests_per_minute=6, detect_org_requests_per_minute=10) as d:
        yield d


def test_a_watermarked_text_gets_a_verdict_and_a_coarse_band_only(wm):
    key = wm.default_key()
    developer = wm.key(wm.user("acme"))
    found = wm.post(developer, text=as_text(watermarked(key, 120, seed=1)))
    assert found.status_code == 200, found.text
    body = found.json()
    assert set(body) == DETECTED
    assert body["detected"] is True and body["key_id"] == key.key_id and body["scheme"] == "kgw-selfhash"
    assert body["p_value_below"] in p_value_bands(1e-4)

    plain = wm.post(developer, text=PROSE)
    assert plain.status_code == 200 and plain.json() == {"detected": False}  # no counts, no score, no z
    short = wm.post(developer, text="hi")
    assert short.json() == {"detected": False, "reason": "too_few_tokens"}


def test_too_few_tokens_is_decided_without_the_key():
    """A text with 16 distinct 4-token windows is long enough whatever the key makes of it; 15 is not."""
    from server.watermark.verdict import long_enough
    from tests.watermark.conftest import material

    text = list(range(1, 21))  # 20 tokens, 16 windows of width 4
    assert long_enough(text, [material()], 16) and not long_enough(text[:-1], [material()], 16)
    assert long_enough([5] * 10 + text, [material()], 16)
    assert not long_enough([5, 6] * 40, [material()], 16)  # a loop has 2 distinct windows


def test_bands_are_few_and_fixed():
    assert p_value_bands(1e-4) == [1e-4, 1e-8, 1e-16, 1e-32]
    assert [p_value_band(p, 1e-4) for p in (9e-5, 2e-8, 9e-9, 1e-20, 1e-300)] == [1e-4, 1e-4, 1e-8, 1e-16, 1e-32]


@pytest.mark.parametrize(
    "payload, code",
    [
        ({"model": MODEL}, "invalid_value"),
        ({"model": MODEL, "text": "x", "token_ids": [1]}, "invalid_value"),
        ({"model": MODEL, "text": "x", "watermark": False}, "unknown_field"),
        ({"model": MODEL, "token_ids": [-1]}, "invalid_value"),
        ({"model": MODEL, "token_ids": ["1"]}, "invalid_value"),
        ({"model": MODEL, "text": ""}, "invalid_value"),
    ],
)
def test_strict_request_model(wm, payload, code):
    resp = wm.client.post("/v1/watermark/detect", json=payload, headers=wm.token(wm.user(), mfa=True))
    assert resp.status_code == 400 and resp.json()["error"]["code"] == code, resp.text


def test_needs_the_detect_permission(wm):
    anonymous = wm.post({"Authorization": ""}, text=PROSE)
    assert anonymous.status_code == 401
    denied = wm.post(wm.key(wm.user("acme"), ("inference",)), text=PROSE)
    assert denied.status_code == 403


def test_token_ids_need_watermark_admin_with_a_fresh_second_factor(wm):
    tokens = watermarked(wm.default_key(), 120, seed=2)
    developer = wm.post(wm.key(wm.user("acme")), token_ids=tokens)
    assert developer.status_code == 403 and developer.json()["error"]["param"] == "token_ids", developer.text
    operator = wm.user()  # an admin of its organization
    stale = wm.post(wm.token(operator, mfa=False), token_ids=tokens)
    assert stale.status_code == 401 and stale.json()["error"]["code"] == "mfa_step_up_required"
    stepped = wm.post(wm.token(operator, mfa=True), token_ids=tokens)
    assert stepped.status_code == 200 and stepped.json()["detected"] is True
    assert stepped.json() == wm.post(wm.token(operator, mfa=True), text=as_text(tokens)).json()


def test_token_ids_outside_the_models_vocabulary_are_refused(wm):
    admin = wm.token(wm.user(), mfa=True)
    vocab = ByteTokenizer().vocab_size
    assert vocab == 257 and max(ByteTokenizer().encode("\U0010ffff\xff" + "".join(map(chr, range(128))))) < vocab
    assert wm.post(admin, token_ids=[vocab - 1] * 20).status_code == 200
    for bad in (vocab, 49_152, 2**31 - 1):
        resp = wm.post(admin, token_ids=[1, 2, 3, bad, 5])
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "token_ids" and error["code"] == "invalid_value"
        assert "token_ids[3]" in error["message"] and "vocabulary" in error["message"]


def test_hf_vocabulary_counts_the_padded_output_layer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 49_280}))
    assert _config_vocab_size(tmp_path) == 49_280
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 32_000}}))
    assert _config_vocab_size(tmp_path) == 32_000
    (tmp_path / "config.json").write_text("not json")
    assert _config_vocab_size(tmp_path) == 0


def test_budget_is_per_user_whatever_key_is_used(wm):
    wm.default_key()
    developer = wm.user("acme")
    keys = [wm.key(developer) for _ in range(4)]  # minting keys buys nothing
    statuses = [wm.post(keys[i % 4], text=f"text number {i} " * 4).status_code for i in range(6)]
    assert statuses == [200] * 6
    limited = wm.post(keys[3], text=PROSE)
    assert limited.status_code == 429, limited.text
    error = limited.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded"
    assert "per user" in error["message"] and int(limited.headers["Retry-After"]) >= 1
    assert [e.details for e in wm.audit("watermark.detect") if e.outcome == "denied"] == [
        {"code": "rate_limit_exceeded"}
    ]
    wm.clock.advance(61)
    assert wm.post(keys[0], text=PROSE).status_code == 200


def test_budget_is_per_organization_too(wm):
    wm.default_key()
    alice, bob, carol = wm.user("acme"), wm.user("acme"), wm.user("acme")
    assert all(wm.post(wm.key(alice), text=f"alice {i} " * 5).is_success for i in range(6))
    assert all(wm.post(wm.key(bob), text=f"bob {i} " * 5).is_success for i in range(4))
    limited = wm.post(wm.key(carol), text=PROSE)  # carol's own budget is untouched; acme's is spent
    assert limited.status_code == 429 and "per organization" in limited.json()["error"]["message"]
    assert wm.post(wm.key(wm.user("globex")), text=PROSE).is_success  # another organization


def test_daily_budget_ends_with_the_utc_day(tmp_path):
    with detect_app(tmp_path, detect_requests_per_day=3) as wm:
        wm.default_key()
        who = wm.key(wm.user("acme"))
        for i in range(3):
            assert wm.post(who, text=f"day one {i} " * 5).is_success
            wm.clock.advance(61)
        spent = wm.post(who, text=PROSE)
        assert spent.status_code == 429 and spent.json()["error"]["code"] == "insufficient_quota"
        assert "per UTC day per user" in spent.json()["error"]["message"]
        assert 60 < int(spent.headers["Retry-After"]) <= 86_400 - 3_600
        wm.clock.advance(86_400)
        assert wm.post(who, text=PROSE).is_success


def test_audit_holds_only_what_the_caller_saw(wm):
    key = wm.default_key()
    developer = wm.key(wm.user("acme"))
    wm.post(developer, text=as_text(watermarked(key, 120, seed=3)))
    wm.post(developer, text=PROSE)
    events = wm.audit("watermark.detect")
    assert len(events) == 2 and events[0].details["detected"] is True and events[1].details["detected"] is False
    for event in events:
        assert set(event.details) <= {"model", *DETECTED, "reason"}  # no z, counts or exact p-value
