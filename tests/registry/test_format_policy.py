"""The format policy: what a model folder may hold, and the safetensors header checks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from server.registry.convert import convert_pickle_to_safetensors, scan_pickle
from server.registry.format_policy import (
    FormatRefused,
    check_folder,
    enforce_folder,
    render_chat_template_sandboxed,
    validate_safetensors_header,
)
from tests.registry.conftest import SHARDS, TEMPLATE, safetensors_bytes

A = ("F32", [2], b"\0" * 8)


def test_synthetic_model_is_accepted(model) -> None:
    assert check_folder(model) == []
    header = validate_safetensors_header(model / SHARDS[0])
    assert header.parameters == 32 * 16 + 16 * 16 and header.dtypes == {"BF16": 768}


def _header(path: Path, header: dict, data: bytes = b"\0" * 8) -> Path:
    path.write_bytes(safetensors_bytes({"a": ("F32", [2], data)}, header=header))
    return path


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, "spans 16 bytes but F32 x [2] needs 8"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "offsets point past the end of the file"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, "trailing bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "leaves a gap of 4 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "not an ordered range"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "non-negative integers"),
        ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, "non-negative integers"),
        ({"a": {"dtype": "OBJECT", "shape": [2], "data_offsets": [0, 8]}}, "has dtype 'OBJECT'"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, "exactly dtype, shape"),
        ({"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "__metadata__"),
    ],
)
def test_lying_headers_are_refused(tmp_path, header, message) -> None:
    with pytest.raises(FormatRefused, match=message.replace("[", r"\[")):
        validate_safetensors_header(_header(tmp_path / "w.safetensors", header))


def test_header_length_and_encoding(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(FormatRefused, match="100 MB bound"):
        validate_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 64) + b"{}")
    with pytest.raises(FormatRefused, match="exceeds the file"):
        validate_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 2) + b"\xff\xfe")
    with pytest.raises(FormatRefused, match="not a valid JSON object"):
        validate_safetensors_header(path)
    dup = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {}}'
    path.write_bytes(struct.pack("<Q", len(dup)) + dup + b"\0" * 8)
    with pytest.raises(FormatRefused, match="duplicate key 'a'"):
        validate_safetensors_header(path)


def test_zero_size_tensors_are_fine(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes({"empty": ("F32", [0, 3], b""), "a": A}))
    assert validate_safetensors_header(path).parameters == 2


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("model.gguf", b"GGUF", "GGUF is accepted only through the import conversion"),
        ("weights.ckpt", b"x", "pickle format .ckpt is refused"),
        ("optimizer.pt", b"x", "pickle format .pt is refused"),
        ("helper.so", b"x", "code files are refused"),
        ("model.onnx", b"x", "file type is not allowed"),
        (".cache/huggingface/x.lock", b"", "hidden paths are refused"),
        ("README.md", b"\xff\xfe", "text file is not valid UTF-8"),
        ("vocab.json", b'{"a": "b"}', "token map must map strings to integer ids"),
        ("extra.json", b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        ("tokenizer.model", b"\x7a\x01\x00", "not a sentencepiece model"),
        ("additional_chat_templates/tool.jinja", b"{% if %}", "chat template does not parse"),
    ],
)
def test_refused_files(model, name, content, reason) -> None:
    (model / name).parent.mkdir(parents=True, exist_ok=True)
    (model / name).write_bytes(content)
    reasons = check_folder(model)
    assert any(reason in r for r in reasons), reasons
    with pytest.raises(FormatRefused):
        enforce_folder(model)


@pytest.mark.parametrize(
    ("name", "change", "reason"),
    [
        ("tokenizer_config.json", {"trust_remote_code": True}, "trust_remote_code is always off"),
        ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["x.Tok", None]}}, "auto_map is a remote-code hook"),
        ("config.json", {"custom_pipelines": {"x": {}}}, "custom_pipelines is a remote-code hook"),
        ("config.json", {"nested": [{"auto_map": {}}]}, "nested[0].auto_map is a remote-code hook"),
        ("tokenizer_config.json", {"chat_template": "{{ ''.__class__ }}"}, "tries to escape the Jinja sandbox"),
        (
            "tokenizer_config.json",
            {"chat_template": [{"name": "tool_use", "template": "{{ cycler.__init__ }}"}]},
            "chat_template[0]: chat template tries to escape",
        ),
    ],
)
def test_remote_code_hooks_and_templates_in_json(model, name, change, reason) -> None:
    data = json.loads((model / name).read_text())
    (model / name).write_text(json.dumps({**data, **change}))
    assert any(reason in r for r in check_folder(model))


def test_allowed_extras(model) -> None:
    (model / "tokenizer_config.json").write_text(json.dumps({"trust_remote_code": False, "chat_template": TEMPLATE}))
    (model / "LICENSE").write_text("Apache-2.0")
    (model / "merges.txt").write_text("#version: 0.2\na b\n")
    (model / "vocab.json").write_text(json.dumps({"auto_map": 0, "a": 1}))
    # A sentencepiece ModelProto: one piece (field 1, length-delimited) holding piece="a" and score=0.
    piece = b"\x0a\x01a\x15\x00\x00\x00\x00"
    (model / "tokenizer.model").write_bytes(b"\x0a" + bytes([len(piece)]) + piece)
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "rag.jinja").write_text("{% generation %}{{ messages }}{% endgeneration %}")
    assert check_folder(model) == []


def test_index_must_match_the_shards(model) -> None:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = SHARDS[0]
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert any("maps 'lm_head.weight'" in r for r in check_folder(model))


def test_required_files(tmp_path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "README.md").write_text("hi")
    reasons = check_folder(tmp_path / "m")
    assert "config.json is missing: a served model folder needs its config" in reasons
    assert "no .safetensors weights found" in reasons


def test_clean_pickle_converts_only_after_scan(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    state["tied"] = state["w"]  # shared storage: safetensors refuses it unless copied
    torch.save(state, tmp_path / "pytorch_model.bin")
    scan = scan_pickle(tmp_path / "pytorch_model.bin")
    assert scan.safe, scan.findings
    out = convert_pickle_to_safetensors(tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors")
    loaded = load_file(out)
    assert torch.equal(loaded["tied"], state["w"]) and loaded["b"].dtype == torch.bfloat16


def test_unparseable_pickle_is_not_safe(tmp_path) -> None:
    (tmp_path / "x.pkl").write_bytes(b"\x80\x05garbage")
    assert not scan_pickle(tmp_path / "x.pkl").safe
    with pytest.raises(FormatRefused, match="not converted"):
        convert_pickle_to_safetensors(tmp_path / "x.pkl", tmp_path / "x.safetensors")


def test_sandbox_renders_normal_templates() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat_template_sandboxed(TEMPLATE, messages, add_generation_prompt=True) == (
        "<|user|>hi</s><|assistant|>"
    )
    assert render_chat_template_sandboxed("{{ messages | tojson }}", messages) == '[{"role": "user", "content": "hi"}]'


def test_broken_index_is_reported_not_raised(model) -> None:
    (model / "model.safetensors.index.json").write_text("{")
    assert any(r.startswith("model.safetensors.index.json: not valid JSON") for r in check_folder(model))
    (model / "model.safetensors.index.json").write_text('{"weight_map": {"x": 1}}')
    assert any("maps 'x' to 1" in r for r in check_folder(model))
