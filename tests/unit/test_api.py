"""Protocol behaviour of the completion endpoints over the fake engine."""

from __future__ import annotations

import json

import pytest

from tests.unit.conftest import MODEL

CHAT = "/v1/chat/completions"


def chat(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}], **extra}


def assert_error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_chat_completion_tags_model_version(client):
    resp = client.post(CHAT, json=chat(temperature=0))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    digest = resp.headers["x-model-digest"].removeprefix("sha256:")
    assert body["system_fingerprint"] == f"{MODEL}@v1+{digest[:12]}"
    assert resp.headers["x-model-version"] == "v1"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_streamed_chat_every_chunk_has_fingerprint_and_usage_at_end(client):
    with client.stream("POST", CHAT, json=chat(stream=True, stream_options={"include_usage": True})) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["system_fingerprint"].startswith(f"{MODEL}@v1+") for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert "Paris" in text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(text.encode())


@pytest.mark.parametrize(
    "field",
    [
        "vllm_xargs",
        "extra_args",
        "chat_template",
        "chat_template_kwargs",
        "logits_processors",
        "cache_salt",
        "watermarking",
        "priority",
        "watermark_key",
        "top_k",
    ],
)
def test_engine_control_fields_are_refused_by_name(client, field):
    err = assert_error(client.post(CHAT, json=chat(**{field: 1})), 400, param=field, code="unknown_field")
    assert field in err["message"]


def test_unknown_field_is_named(client):
    err = assert_error(client.post(CHAT, json=chat(frobnicate=True)), 400, param="frobnicate")
    assert "frobnicate" in err["message"]


@pytest.mark.parametrize(
    "payload,param",
    [
        (chat(max_tokens=-1), "max_tokens"),
        (chat(max_tokens="5"), "max_tokens"),
        (chat(temperature="hot"), "temperature"),
        (chat(temperature=3), "temperature"),
        (chat(n=0), "n"),
        (chat(n=99), "n"),
        (chat(max_tokens=100000), "max_tokens"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(logprobs=True, top_logprobs=19), "top_logprobs"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, None),
    ],
)
def test_bad_values_are_400_naming_the_field(client, payload, param):
    err = assert_error(client.post(CHAT, json=payload), 400)
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err


def test_unknown_model_is_404(client):
    assert_error(client.post(CHAT, json={**chat(), "model": "nope"}), 404, param="model", code="model_not_found")


def test_invalid_utf8_and_json(client):
    assert_error(
        client.post(CHAT, content=b'{"model": "\xff\xfe"}', headers={"content-type": "application/json"}),
        400,
        code="invalid_json",
    )
    assert_error(
        client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"}), 400, code="invalid_json"
    )
    assert_error(client.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_error(client.post(CHAT, content=b"", headers={"content-type": "application/json"}), 400)


def test_oversized_body_is_413(client, settings):
    big = "x" * (settings.limits.max_body_bytes + 10)
    assert_error(client.post(CHAT, json=chat(user=big)), 413, code="request_too_large")


def test_context_length_is_enforced_exactly(client):
    # The fake tokenizer is byte-level: the prompt length is predictable.
    long = "y" * 600
    assert_error(
        client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long}]}),
        400,
        code="context_length_exceeded",
    )
    err = assert_error(
        client.post(CHAT, json=chat(max_tokens=500)), 400, param="max_tokens", code="context_length_exceeded"
    )
    assert "512" in err["message"]


def test_n_choices_and_stop(client):
    body = client.post(CHAT, json=chat(n=3, stop=["Paris"])).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all("Paris" not in c["message"]["content"] for c in body["choices"])


def test_max_tokens_length_finish(client):
    body = client.post(CHAT, json=chat(max_completion_tokens=5)).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_logprobs_shape(client):
    body = client.post(CHAT, json=chat(logprobs=True, top_logprobs=1, max_tokens=3)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and {"token", "logprob", "bytes", "top_logprobs"} <= set(content[0])


def test_tools_schema_validated_and_named_choice(client):
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    assert_error(client.post(CHAT, json=chat(tools=[bad_tool])), 400, code="invalid_schema")
    tool = {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"answer": {"type": "string"}}}},
    }
    body = client.post(
        CHAT, json=chat(tools=[tool], tool_choice={"type": "function", "function": {"name": "lookup"}})
    ).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "lookup" and json.loads(call["function"]["arguments"]) == {"answer": "Paris"}
    assert_error(
        client.post(CHAT, json=chat(tools=[tool], tool_choice={"type": "function", "function": {"name": "other"}})), 400
    )


def test_completions_prompt_list_and_echo(client):
    resp = client.post(
        "/v1/completions", json={"model": MODEL, "prompt": ["capital of France", "hi"], "max_tokens": 8, "echo": True}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"].startswith("capital of France")
    assert body["usage"]["completion_tokens"] == 16


def test_completions_stream_multiple_prompts(client):
    with client.stream(
        "POST", "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 4, "stream": True}
    ) as resp:
        lines = [line for line in resp.iter_lines() if line]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["text"]
    assert texts[0] == texts[1] == "Hell"


def test_models_list_and_get(client):
    data = client.get("/v1/models").json()["data"]
    assert data[0]["id"] == MODEL and data[0]["version"] == "v1" and data[0]["digest"].startswith("sha256:")
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert_error(client.get("/v1/models/missing"), 404)


def test_health_ready_metrics_and_404_shape(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    client.post(CHAT, json=chat())
    text = client.get("/metrics").text
    assert "server_requests_total" in text and "server_completion_tokens_total" in text
    assert "server_engine_queue_depth" in text
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get(CHAT), 405)
