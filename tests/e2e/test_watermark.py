"""Watermarking end to end on the live server, with the default `auto` scheme: a sampled answer (Gumbel
in vLLM's sampler, with top_p and a penalty) and a greedy one (kgw-gated) are detected under their
organization's key by a caller of that organization, not by another organization; an exempt key's answers
carry no mark and say why."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import MODEL, LiveServer

pytestmark = pytest.mark.e2e

STORY = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and a storm."}]
GREEDY_TOKENS = 400  # kgw-gated marks only where the model is unsure: a long answer leaves no doubt


def _cli_json(server: LiveServer, *argv: str) -> dict:
    out = server.cli(*argv, "--json") if argv[0] != "watermark" else server.cli(*argv)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _client(server: LiveServer, key: str) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)


def _answer(client: OpenAI, max_tokens: int = 200, **sampling) -> tuple[str, str]:
    sampling = sampling or {"temperature": 1.0, "top_p": 0.9, "presence_penalty": 0.3}
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=STORY, max_tokens=max_tokens, **sampling
    )
    return raw.parse().choices[0].message.content, raw.headers["x-watermark"]


def _detect(server: LiveServer, key: str, text: str) -> dict:
    resp = httpx.post(
        f"{server.url}/v1/watermark/detect",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "text": text},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) in ({"detected", "scheme", "key_id", "p_value_below"}, {"detected"}), body  # a verdict only
    return body


def test_answers_are_detected_by_their_org_only_and_exempt_keys_are_unmarked(live_server):
    s = live_server
    org_a = next(o for o in _cli_json(s, "orgs", "list") if o["name"] == "default")["id"]
    org_key = _cli_json(s, "watermark", "rotate", "--org", org_a, "--reason", "e2e: org key")
    assert org_key["org_id"] == org_a and "key" not in org_key
    detector_a = s.create_key("inference,watermark:detect")
    client_a = _client(s, detector_a)
    s.wait_for_watermark(detector_a, f"gumbel; key-id={org_key['key_id']}")

    text, header = _answer(client_a)  # sampled, with top_p and a presence penalty: Gumbel in the sampler
    assert header == f"gumbel; key-id={org_key['key_id']}"
    found = _detect(s, detector_a, text)
    assert found["detected"] and found["scheme"] == "gumbel" and found["key_id"] == org_key["key_id"], found

    # A greedy answer carries kgw-gated; the detector recomputes where the model was unsure.
    essay, header = _answer(client_a, max_tokens=GREEDY_TOKENS, temperature=0)
    assert header == f"kgw-gated; key-id={org_key['key_id']}"
    found = _detect(s, detector_a, essay)
    assert found["detected"] and found["scheme"] == "kgw-gated" and found["key_id"] == org_key["key_id"], found

    # Another organization tries only its own keys and the deployment default: not detected.
    org_b = _cli_json(s, "orgs", "create", "e2e-other-org")["id"]
    user_b = _cli_json(s, "users", "create", "--org", org_b, "--email", "b@example.com", "--roles", "developer")
    detector_b = json.loads(
        s.cli("keys", "create", "--user", user_b["id"], "--scopes", "inference,watermark:detect", "--json").stdout
    )["key"]
    for answer in (text, essay):
        other = _detect(s, detector_b, answer)
        assert other == {"detected": False}, other

    # An exempt key's answers carry no watermark, and say why.
    plain, header = _answer(_client(s, s.exempt_key()))
    assert header == "off; reason=exempt"
    assert _detect(s, detector_a, plain)["detected"] is False


def test_streamed_answers_name_their_watermark_and_clients_cannot_touch_it(live_server):
    client = _client(live_server, live_server.key)
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=STORY, max_tokens=8, stream=True
    ) as resp:
        assert resp.headers["x-watermark"].startswith("gumbel; key-id=wk_")  # temperature defaults to 1
        assert "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    for field in ({"vllm_xargs": {"_wm": None}}, {"extra_args": {"_wm": {}}}, {"watermark": False}):
        resp = httpx.post(
            f"{live_server.url}/v1/chat/completions",
            headers=live_server.headers,
            json={"model": MODEL, "messages": STORY, "max_tokens": 4, **field},
            timeout=60,
        )
        assert resp.status_code == 400 and resp.json()["error"]["param"] == next(iter(field)), resp.text
