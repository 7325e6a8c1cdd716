"""What a model folder may contain before it is stored, signed and served.

Why an allowlist: a model folder is read by several parsers (transformers, tokenizers, sentencepiece, vLLM's
weight loader), and some formats execute code when read. We accept only formats that are data:

- ``*.safetensors`` weights, whose header we validate ourselves (``validate_safetensors_header``) so that a
  header lying about offsets, sizes or dtypes is refused before any loader maps it;
- JSON configs and tokenizers, parsed strictly (duplicate keys refused: two parsers could read different
  values) and refused when they hold ``auto_map``, ``custom_pipelines`` or a true ``trust_remote_code``
  (the hooks transformers uses to import code from the folder);
- ``tokenizer.model`` (sentencepiece): a protobuf read by a C++ parser, not code; we check its top-level
  wire format and field numbers so that a file of another kind under that name is refused;
- chat templates (``*.jinja``, or strings in ``tokenizer_config.json`` / ``chat_template.json``), parsed and
  test-rendered in Jinja's immutable sandbox (``render_chat_template_sandboxed``): an escape is refused;
- inert text (README, LICENSE, ``*.md``, ``*.txt``, ``merges.txt``, ``.gitattributes``), which must be UTF-8.

Everything else is refused, most importantly pickle formats (``.bin``, ``.pt``, ``.pth``, ``.ckpt``,
``.pkl``...: unpickling runs code; ``models import --convert-pickle`` converts torch checkpoints to safetensors
after a clean scan, see ``server.registry.convert``), code (``.py``: remote-code hooks), GGUF (accepted only
through the import conversion), symlinks, hidden paths and special files. Refusal reasons name the file and
the rule, so an operator can act on them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "SAFETENSORS_DTYPES",
    "FormatRefused",
    "SafetensorsHeader",
    "check_folder",
    "enforce_folder",
    "parse_strict_json",
    "render_chat_template_sandboxed",
    "validate_safetensors_header",
]

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors format itself sets
MAX_JSON_BYTES = 256 * 1024 * 1024
MAX_TEXT_BYTES = 64 * 1024 * 1024
MAX_TEMPLATE_CHARS = 1024 * 1024
# Byte width of each accepted dtype; sub-byte and exotic dtypes are refused until a loader we run needs them.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz", ".h5"})
# The pickle formats torch.load reads: the ones `models import --convert-pickle` converts (server.registry.convert).
TORCH_PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
CODE_SUFFIXES = frozenset({".py", ".pyc", ".pyo", ".pyd", ".so", ".dll", ".dylib", ".sh", ".ipynb", ".js", ".exe"})
TEXT_NAMES = frozenset({"merges.txt", "LICENSE", "NOTICE", "README", ".gitattributes"})
TEXT_SUFFIXES = frozenset({".md", ".txt"})
# JSON files that are token -> id maps: their keys are vocabulary, not settings, so they are not searched for
# hook names (a token spelled "auto_map" is not a hook) but must be exactly a str -> int map.
TOKEN_MAPS = frozenset({"vocab.json", "added_tokens.json"})
FORBIDDEN_KEYS = ("auto_map", "custom_pipelines")


class FormatRefused(ValueError):
    """The folder holds something the policy refuses; ``reason`` says what and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: tensors as name -> (dtype, shape, begin, end) and the metadata."""

    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]
    metadata: dict[str, str]
    data_bytes: int

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape, _, _ in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        """Parameter count per dtype (what the BOM reports as the weights' precision)."""
        counts: dict[str, int] = {}
        for dtype, shape, _, _ in self.tensors.values():
            counts[dtype] = counts.get(dtype, 0) + math.prod(shape)
        return counts


def validate_safetensors_header(path: Path) -> SafetensorsHeader:
    """Validate a safetensors file's header against its size; raise ``FormatRefused`` naming the flaw.

    The checks close the gaps a loader could be steered through: the 8-byte little-endian length is bounded
    and within the file, the header is a UTF-8 JSON object without duplicate keys, every dtype is allowed,
    shapes are non-negative ints, each tensor's byte range matches dtype x shape, and the ranges, sorted,
    tile the data section exactly: no overlap (two tensors aliasing bytes), no gap (hidden payload), no
    byte past the end.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise FormatRefused(f"{path.name}: safetensors file of {size} bytes has no header length")
        length = int.from_bytes(handle.read(8), "little")
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise FormatRefused(
                f"{path.name}: safetensors header length {length} exceeds "
                f"{'the 100 MB bound' if length > MAX_HEADER_BYTES else f'the file ({size} bytes)'}"
            )
        raw = handle.read(length)
    try:
        header = parse_strict_json(raw)
    except ValueError as exc:
        raise FormatRefused(f"{path.name}: safetensors header is not a valid JSON object: {exc}") from None
    if not isinstance(header, dict):
        raise FormatRefused(f"{path.name}: safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatRefused(f"{path.name}: safetensors __metadata__ must map strings to strings")
    tensors = {name: _tensor_entry(path, name, entry) for name, entry in header.items()}
    position = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            problem = (
                "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            )
            raise FormatRefused(f"{path.name}: tensor {name!r} data_offsets [{begin}, {end}] {problem}")
        position = end
    if position != data_bytes:
        raise FormatRefused(
            f"{path.name}: tensors cover {position} bytes but the data section holds {data_bytes} "
            f"({'offsets point past the end of the file' if position > data_bytes else 'trailing bytes'})"
        )
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_bytes=data_bytes)


def _tensor_entry(path: Path, name: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    where = f"{path.name}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatRefused(f"{where} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise FormatRefused(f"{where} has dtype {dtype!r}, not one of {sorted(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise FormatRefused(f"{where} shape {shape!r} must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise FormatRefused(f"{where} data_offsets {offsets!r} must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise FormatRefused(f"{where} data_offsets [{begin}, {end}] are not an ordered range")
    expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if end - begin != expected:
        raise FormatRefused(f"{where} spans {end - begin} bytes but {dtype} x {shape} needs {expected}")
    return dtype, tuple(shape), begin, end


def parse_strict_json(raw: bytes) -> Any:
    """Parse UTF-8 JSON, refusing duplicate keys (two parsers may keep different duplicates)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise ValueError(f"duplicate key {key!r}")
            result[key] = value
        return result

    return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)


def check_folder(folder: Path) -> list[str]:
    """Every reason the policy refuses ``folder`` (empty when it is acceptable)."""
    folder = Path(folder)
    reasons: list[str] = []
    headers: dict[str, SafetensorsHeader] = {}
    names: list[str] = []
    for path in _walk(folder, reasons):
        name = path.relative_to(folder).as_posix()
        names.append(name)
        try:
            kind = _kind(name)
            if kind == "safetensors":
                headers[name] = validate_safetensors_header(path)
            elif kind == "json":
                _check_json(folder, name)
            elif kind == "template":
                _check_template(_read_limited(path, MAX_TEXT_BYTES).decode("utf-8"), name)
            elif kind == "sentencepiece":
                _check_sentencepiece(path)
            else:
                _read_limited(path, MAX_TEXT_BYTES).decode("utf-8")
        except FormatRefused as exc:
            reasons.append(exc.reason)
        except UnicodeDecodeError:
            reasons.append(f"{name}: text file is not valid UTF-8")
    if "config.json" not in names:
        reasons.append("config.json is missing: a served model folder needs its config")
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights:
        reasons.append("no .safetensors weights found")
    if "model.safetensors.index.json" in names and len(headers) == len(weights):
        reasons.extend(_check_index(folder, headers))
    return reasons


def enforce_folder(folder: Path) -> None:
    """Raise ``FormatRefused`` with every reason when the policy refuses ``folder``."""
    reasons = check_folder(folder)
    if reasons:
        raise FormatRefused("; ".join(reasons))


def _walk(folder: Path, reasons: list[str]) -> list[Path]:
    """Regular files below ``folder``; symlinks and special files become reasons, never followed."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for entry in sorted(dirs + files):
            path = Path(root, entry)
            mode = os.lstat(path).st_mode
            name = path.relative_to(folder).as_posix()
            if stat.S_ISLNK(mode):
                reasons.append(f"{name} is a symlink: model folders must hold real files")
                dirs[:] = [d for d in dirs if d != entry]
            elif stat.S_ISREG(mode):
                found.append(path)
            elif not stat.S_ISDIR(mode):
                reasons.append(f"{name} is not a regular file")
    return found


def _kind(name: str) -> str:
    path = PurePosixPath(name)
    suffix = path.suffix.lower()
    if any(part.startswith(".") for part in path.parts) and name != ".gitattributes":
        raise FormatRefused(f"{name}: hidden paths are refused (remove .git/.cache folders before import)")
    if suffix in PICKLE_SUFFIXES:
        remedy = (
            "to convert it to safetensors after a clean fickling scan, import with --convert-pickle"
            if suffix in TORCH_PICKLE_SUFFIXES
            else "convert it to safetensors before import"
        )
        raise FormatRefused(f"{name}: pickle format {suffix} is refused (unpickling runs code); {remedy}")
    if suffix in CODE_SUFFIXES:
        raise FormatRefused(f"{name}: code files are refused (trust_remote_code is always off)")
    if suffix == ".gguf":
        raise FormatRefused(f"{name}: GGUF is accepted only through the import conversion to safetensors")
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".json":
        return "json"
    if suffix == ".jinja" and (name == "chat_template.jinja" or path.parent.name == "additional_chat_templates"):
        return "template"
    if name == "tokenizer.model":
        return "sentencepiece"
    if path.name in TEXT_NAMES or path.name.startswith(("LICENSE", "NOTICE")) or suffix in TEXT_SUFFIXES:
        return "text"
    raise FormatRefused(f"{name}: file type is not allowed (safetensors, JSON, tokenizer, chat template, text)")


def _check_json(folder: Path, name: str) -> None:
    raw = _read_limited(folder / name, MAX_JSON_BYTES)
    try:
        data = parse_strict_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatRefused(f"{name}: not valid JSON: {exc}") from None
    if PurePosixPath(name).name in TOKEN_MAPS:
        if not isinstance(data, dict) or not all(type(v) is int for v in data.values()):
            raise FormatRefused(f"{name}: a token map must map strings to integer ids")
        return
    if name == "tokenizer.json" and isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = {**data, "model": {k: v for k, v in data["model"].items() if k != "vocab"}}
    _refuse_hooks(name, data, "")
    for label, template in _templates_in(name, data):
        _check_template(template, label)


def _refuse_hooks(name: str, value: Any, where: str) -> None:
    """Refuse transformers' remote-code hooks anywhere in a JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}" if where else key
            if key in FORBIDDEN_KEYS:
                raise FormatRefused(f"{name}: {here} is a remote-code hook; model folders must not carry code")
            if key == "trust_remote_code" and item:
                raise FormatRefused(f"{name}: {here} is set; trust_remote_code is always off")
            _refuse_hooks(name, item, here)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_hooks(name, item, f"{where}[{index}]")


def _check_sentencepiece(path: Path) -> None:
    """Walk the top-level protobuf fields of a sentencepiece ModelProto (fields 1-5, at least one piece)."""
    data = _read_limited(path, MAX_TEXT_BYTES)
    position, pieces = 0, 0
    while position < len(data):
        tag, position = _varint(data, position, path)
        field, wire = tag >> 3, tag & 7
        if not 1 <= field <= 5 or wire not in (0, 2):
            raise FormatRefused(f"{path.name}: not a sentencepiece model (field {field}, wire type {wire})")
        value, position = _varint(data, position, path)
        if wire == 2:
            position += value
            if position > len(data):
                raise FormatRefused(f"{path.name}: sentencepiece field {field} runs past the end of the file")
        pieces += field == 1
    if not pieces:
        raise FormatRefused(f"{path.name}: sentencepiece model has no pieces")


def _varint(data: bytes, position: int, path: Path) -> tuple[int, int]:
    result = shift = 0
    while position < len(data) and shift < 64:
        byte = data[position]
        result |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return result, position
        shift += 7
    raise FormatRefused(f"{path.name}: truncated or malformed protobuf varint")


def _check_index(folder: Path, headers: dict[str, SafetensorsHeader]) -> list[str]:
    """The shard index must name exactly the tensors each shard holds: a mismatch is a loader differential."""
    try:
        index = parse_strict_json(_read_limited(folder / "model.safetensors.index.json", MAX_JSON_BYTES))
    except (ValueError, FormatRefused):
        return []  # already reported by the JSON check
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return ["model.safetensors.index.json: weight_map is missing"]
    stored = {tensor: shard for shard, header in headers.items() for tensor in header.tensors}
    reasons = []
    for tensor, shard in sorted(weight_map.items()):
        if stored.get(tensor) != shard:
            reasons.append(f"model.safetensors.index.json maps {tensor!r} to {shard!r}, which does not hold it")
    unlisted = sorted(set(stored) - set(weight_map))
    if unlisted:
        reasons.append(f"model.safetensors.index.json does not list tensors {unlisted[:5]}")
    return reasons


def _read_limited(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FormatRefused(f"{path.name}: larger than the {limit // (1024 * 1024)} MB limit for its type")
    return data


def render_chat_template_sandboxed(template: str, messages: list[dict[str, Any]], **context: Any) -> str:
    """Render a chat template in Jinja's immutable sandbox; an escape attempt raises ``SecurityError``.

    The sandbox refuses dunder and internal attributes (``__class__``, ``__globals__``, ``mro``...), unsafe
    callables and ``str.format`` tricks, caps ``range``, and (immutable) refuses mutating lists and dicts.
    Jinja's default is to return a silent undefined for an unsafe attribute; ours raises at the first
    touch, so an escape attempt is an error, never a partly executed template.
    """
    return _sandbox().from_string(template).render(messages=messages, **context)


@functools.lru_cache(maxsize=1)
def _sandbox() -> Any:
    """The environment transformers uses for chat templates (same filters, globals and tags), made stricter."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class StrictSandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    class Generation(Extension):
        """``{% generation %}`` blocks (assistant-token tracking in transformers) render their body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now(UTC).strftime(fmt)
    return env


_SAMPLE_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "What is 2 + 2?"},
]
_SAMPLE_CONTEXT = dict(add_generation_prompt=True, bos_token="<s>", eos_token="</s>")  # noqa: S106 - not secrets


def _check_template(template: Any, label: str) -> None:
    """Parse and test-render a template in the sandbox: syntax errors and escape attempts are refused."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import SecurityError

    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        raise FormatRefused(f"{label}: chat template must be a string of at most {MAX_TEMPLATE_CHARS} characters")
    try:
        render_chat_template_sandboxed(template, _SAMPLE_CHAT, **_SAMPLE_CONTEXT)
    except TemplateSyntaxError as exc:
        raise FormatRefused(f"{label}: chat template does not parse: {exc.message} (line {exc.lineno})") from None
    except SecurityError as exc:
        raise FormatRefused(f"{label}: chat template tries to escape the Jinja sandbox: {exc}") from None
    except Exception:  # noqa: S110 - a template may reject our sample chat; only escapes and syntax are refused here
        pass


def _templates_in(name: str, data: Any) -> list[tuple[str, Any]]:
    """Chat templates a JSON file carries: a string, or a list of {name, template} (tokenizer_config.json)."""
    value = data.get("chat_template") if isinstance(data, dict) else None
    if value is None:
        return []
    if isinstance(value, list):
        return [
            (f"{name}: chat_template[{i}]", item.get("template") if isinstance(item, dict) else item)
            for i, item in enumerate(value)
        ]
    return [(f"{name}: chat_template", value)]
