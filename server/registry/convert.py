"""Operator-approved conversion of pickled torch weights to safetensors (``models import NAME DIR --convert-pickle``).

Why a conversion and not an exception to the format policy: unpickling runs code, so a pickle is never stored,
signed or served. An operator who must import a model published as ``pytorch_model.bin`` (or ``.pt``, ``.pth``,
``.ckpt``, ``.pkl``) asks for a conversion; what gets signed is the resulting safetensors, and the version's
provenance, and so its signed BOM, names the pickles it came from with their SHA-256 digests.

Two independent guards stand between a pickle and the process:

1. ``scan_pickle``: fickling reads the opcodes without running them. It scans every pickle the loader would
   run, read the way torch reads the file (a zip archive only when the file starts with a zip record: then
   every ``*.pkl`` record; otherwise the five stacked pickles of the legacy format), and any finding in any
   file refuses the whole import before anything is loaded.
2. ``torch.load(weights_only=True)``: torch's restricted unpickler, which rebuilds only tensors and plain
   containers. ``weights_only=False`` is never used.

What is converted is a flat name -> tensor map: the top-level dict, or one nested under ``state_dict`` or
``model`` (training checkpoints; the other top-level entries, such as optimizer state or the epoch, are left out
and named in the provenance). A value that is not a tensor is refused with its key. Tensors sharing storage (tied
weights) are copied apart, since safetensors refuses aliasing. Each pickle becomes one safetensors file
(``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus an index), written in private staging
next to the folder's other files; the pickles (and a pickle shard index) are not carried over, and the staging
folder is then imported through the normal path: format policy, hashing, signing, BOM.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import io
import json
import os
import re
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from server.registry.format_policy import (
    PICKLE_SUFFIXES,
    TORCH_PICKLE_SUFFIXES,
    FormatRefused,
    SafetensorsHeader,
    validate_safetensors_header,
)
from server.registry.store import BlobStore, copy_tree

__all__ = [
    "NESTED_STATE_DICT_KEYS",
    "Conversion",
    "PickleScan",
    "convert_folder",
    "convert_pickle_to_safetensors",
    "converted_folder",
    "scan_pickle",
]

# Where training checkpoints keep the weights when the top level is not itself a state dict (Lightning: state_dict).
NESTED_STATE_DICT_KEYS = ("state_dict", "model")
TORCH_ZIP_MAGIC = b"PK\x03\x04"  # torch.load's own test for its zip format; anything else is read as legacy
LEGACY_PICKLES = 5  # legacy format: magic number, protocol, sys info, the object, storage keys; then raw bytes
MAX_PICKLE_RECORD = 256 * 1024 * 1024  # a data.pkl holds tensor metadata only; a huge record is a zip bomb
# safetensors dtype -> torch dtype name: the tensors the format policy accepts (format_policy.SAFETENSORS_DTYPES).
TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
    "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
}  # fmt: skip
NOT_WEIGHTS_HINT = "remove files that are not weights (training_args.bin, optimizer.pt...) before converting"


@dataclass(frozen=True)
class PickleScan:
    """fickling's verdict on a pickle file: ``safe`` only when every pickle the loader would run is LIKELY_SAFE."""

    path: Path
    safe: bool
    severity: str
    findings: tuple[str, ...]

    def refusal(self) -> str:
        """The import's refusal reason: the file, the worst severity, and fickling's worst findings first."""
        detail = "; ".join(self.findings[:5]) or self.severity
        return f"{self.path.name}: pickle scan found {self.severity} content, not converted: {detail}"


@dataclass(frozen=True)
class Conversion:
    """A converted model folder in private staging, and the provenance record of where it came from."""

    folder: Path
    record: dict[str, Any]


def scan_pickle(path: Path) -> PickleScan:
    """Scan a torch checkpoint (zip or legacy) or a raw pickle with fickling, without loading it.

    fickling's default analyses flag every torch checkpoint (any non-stdlib import, any call to one, and its
    interpreter sees the rebuilt tensors as unused variables). We replace the import rule with fickling's ML
    allowlist, which is stricter: every import, stdlib included, must be a known-inert ML name (tensor
    rebuilders, storages, OrderedDict...). A pickle can only call what it imports, so a plain call to a name
    imported from that allowlist is not a finding; every other call still is, as are overtly bad calls (eval,
    exec, open...), unsafe imports, scanner deactivation, expansion attacks and malformed opcodes. A file
    fickling cannot parse, or that holds fewer pickles than the loader reads, is unsafe.
    """
    from fickling.analysis import Analysis, Analyzer, NonStandardImports, Severity, UnusedVariables, check_safety
    from fickling.ml import MLAllowlist

    path = Path(path)
    analyses = [a for a in Analysis.ALL if not isinstance(a, NonStandardImports | UnusedVariables)]
    analyzer = Analyzer([*analyses, MLAllowlist()])
    flagged: list[tuple[Any, str]] = []  # (fickling Severity, finding)
    try:
        streams = _pickle_streams(path)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        flagged.append((Severity.LIKELY_UNSAFE, f"{path.name}: cannot be scanned ({exc})"))
        streams = []
    for label, pickles, expected in streams:
        if isinstance(pickles, Exception):
            flagged.append((Severity.LIKELY_UNSAFE, f"{label}: cannot be parsed ({type(pickles).__name__}: {pickles})"))
            continue
        if expected and len(pickles) < expected:
            flagged.append(
                (
                    Severity.LIKELY_UNSAFE,
                    f"{label}: not a torch checkpoint (a zip archive, or {expected} stacked pickles; found "
                    f"{len(pickles)}): what the loader would read next was not scanned",
                )
            )
        for pickled in pickles:
            try:
                results = check_safety(pickled, analyzer=analyzer).results
            except Exception as exc:  # an analysis that cannot finish vouches for nothing
                flagged.append((Severity.LIKELY_UNSAFE, f"{label}: cannot be analysed ({type(exc).__name__}: {exc})"))
                continue
            allowed = _allowlisted_names(pickled)
            for finding in results:
                plain_call = (
                    finding.analysis_name == "OvertlyBadEval"
                    and finding.severity == Severity.LIKELY_UNSAFE
                    and _callee(finding.trigger) in allowed
                )
                if finding.severity > Severity.LIKELY_SAFE and not plain_call:
                    flagged.append((finding.severity, f"{label}: {finding}"))
    flagged.sort(key=lambda item: -item[0].severity)  # the worst first: that is what a refusal shows
    severity = flagged[0][0] if flagged else Severity.LIKELY_SAFE
    findings = tuple(dict.fromkeys(text for _, text in flagged))
    return PickleScan(path=path, safe=not flagged, severity=severity.name, findings=findings)


def convert_pickle_to_safetensors(src: Path, dst: Path) -> Path:
    """Convert one pickled state dict to safetensors at ``dst``, only after a clean scan; return ``dst``.

    The scan and the load read ``src`` twice: it must be a file no one else can change (``converted_folder``
    converts a private copy).
    """
    src, dst = Path(src), Path(dst)
    scan = scan_pickle(src)
    if not scan.safe:
        raise FormatRefused(scan.refusal())
    tensors, _ = _load_state_dict(src)
    partial = dst.with_name(f"{dst.name}.partial-{os.getpid()}")
    try:
        _save(tensors, partial, src.name)
        os.replace(partial, dst)
    finally:
        partial.unlink(missing_ok=True)
    return dst


def convert_folder(source: Path, target: Path) -> dict[str, Any]:
    """Build in ``target`` the safetensors form of the model folder ``source``; return the provenance record.

    ``source`` must be a private copy (``converted_folder`` makes one): its files other than pickles are moved,
    not copied. Every pickle is scanned before any is loaded; one finding refuses the whole folder.
    """
    source, target = Path(source), Path(target)
    names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    pickles = [n for n in names if PurePosixPath(n).suffix.lower() in PICKLE_SUFFIXES]
    _refuse_unconvertible(names, pickles)
    digests = {n: _sha256(source / n) for n in pickles}
    refusals = [scan.refusal() for scan in (scan_pickle(source / n) for n in pickles) if not scan.safe]
    if refusals:
        raise FormatRefused("; ".join(refusals) + "; nothing was loaded")

    import torch

    target.mkdir(mode=0o700)
    outputs = (
        ["model.safetensors"]
        if len(pickles) == 1
        else [f"model-{i:05d}-of-{len(pickles):05d}.safetensors" for i in range(1, len(pickles) + 1)]
    )
    weight_map: dict[str, str] = {}
    entries, total = [], 0
    for name, output in zip(pickles, outputs, strict=True):
        tensors, note = _load_state_dict(source / name)
        clash = sorted(set(tensors) & set(weight_map))
        if clash:
            raise FormatRefused(f"{name}: tensors {clash[:3]} are also in another pickle file; not converted")
        total += _save(tensors, target / output, name).data_bytes
        weight_map.update(dict.fromkeys(tensors, output))
        size = (source / name).stat().st_size
        entries.append({"name": name, "sha256": digests[name], "size_bytes": size, "tensors": len(tensors), **note})
        del tensors
    if len(outputs) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    dropped = []
    for name in names:
        if name in pickles:
            continue
        if _is_pickle_index(name):  # it names the pickle shards, which are not carried over
            dropped.append(name)
            continue
        (target / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.rename(source / name, target / name)
    record: dict[str, Any] = {
        "pickles": entries,
        "safetensors": outputs,
        "scanner": f"fickling {importlib.metadata.version('fickling')}",
        "loader": f"torch {torch.__version__} torch.load(weights_only=True)",
    }
    if dropped:
        record["dropped"] = dropped
    return record


@contextmanager
def converted_folder(store: BlobStore, src: Path) -> Iterator[Conversion]:
    """Copy ``src`` into the store's private staging, convert it there, and yield the folder to import.

    The private copy is what is scanned, hashed and loaded, so a source changed during the conversion cannot
    slip other bytes in between the scan and the load. Staging, the pickles included, is removed on exit,
    whether the import that follows succeeds or not.
    """
    with store.staging("convert-") as staging:
        copy_tree(Path(src), staging / "source")
        record = convert_folder(staging / "source", staging / "model")
        yield Conversion(folder=staging / "model", record=record)


def _refuse_unconvertible(names: list[str], pickles: list[str]) -> None:
    if not pickles:
        raise FormatRefused(
            "--convert-pickle: the folder holds no pickle weights "
            f"({', '.join(sorted(TORCH_PICKLE_SUFFIXES))}); import it without the flag"
        )
    reasons = []
    for name in pickles:
        suffix = PurePosixPath(name).suffix.lower()
        if "/" in name:
            reasons.append(f"{name}: only weights at the top of the folder are converted")
        elif suffix not in TORCH_PICKLE_SUFFIXES:
            reasons.append(f"{name}: {suffix} is not a torch checkpoint; convert it to safetensors before import")
    present = [n for n in names if n.endswith(".safetensors")]
    if present:
        reasons.append(
            f"the folder already holds safetensors weights ({', '.join(present[:3])}): remove the pickle copies "
            "and import without --convert-pickle"
        )
    if reasons:
        raise FormatRefused("; ".join(reasons))


def _pickle_streams(path: Path) -> list[tuple[str, list[Any] | Exception, int | None]]:
    """The pickles torch.load would run, parsed by fickling: (label, pickles or parse error, pickles expected)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if handle.read(4) == TORCH_ZIP_MAGIC:
            handle.seek(0)
            return [(label, _parse(io.BytesIO(data), None), None) for label, data in _zip_records(handle, path.name)]
        handle.seek(0)
        return [(path.name, _parse(handle, LEGACY_PICKLES), LEGACY_PICKLES)]


def _zip_records(handle: IO[bytes], name: str) -> list[tuple[str, bytes]]:
    """Every ``*.pkl`` record of a torch zip checkpoint, duplicates refused (two readers may pick different ones)."""
    with zipfile.ZipFile(handle) as archive:
        infos = archive.infolist()
        twice = sorted(n for n, count in Counter(i.filename for i in infos).items() if count > 1)
        if twice:
            raise ValueError(f"zip archive holds {twice[:3]} more than once")
        records = [i for i in infos if i.filename.endswith(".pkl")]
        if not any(PurePosixPath(i.filename).name == "data.pkl" for i in records):
            raise ValueError("zip archive has no data.pkl record: not a torch checkpoint")
        large = [i.filename for i in records if i.file_size > MAX_PICKLE_RECORD]
        if large:
            raise ValueError(f"zip record {large[0]} is larger than {MAX_PICKLE_RECORD // (1024 * 1024)} MB")
        return [(f"{name}:{i.filename}", archive.read(i)) for i in records]


def _parse(stream: IO[bytes], limit: int | None) -> list[Any] | Exception:
    """The pickles in ``stream``: all of them, or the first ``limit`` (what the legacy loader reads)."""
    from fickling.fickle import EmptyPickleError, Pickled, StackedPickle

    try:
        if limit is None:
            return list(StackedPickle.load(stream))
        pickles: list[Any] = []
        while len(pickles) < limit:
            try:
                pickled = Pickled.load(stream)
            except EmptyPickleError:
                break
            if not len(pickled):
                break
            pickles.append(pickled)
        return pickles
    except Exception as exc:  # a pickle the scanner cannot parse is a pickle we cannot vouch for
        return exc


def _allowlisted_names(pickled: Any) -> set[str]:
    """Names the pickle imports from fickling's ML allowlist: the only callables a plain call may reach."""
    from fickling.ml import ML_ALLOWLIST

    names = set()
    for node in pickled.properties.imports:
        if isinstance(node, ast.ImportFrom) and node.module in ML_ALLOWLIST:
            names.update(a.asname or a.name for a in node.names if a.name in ML_ALLOWLIST[node.module])
    return names


def _callee(trigger: str | None) -> str | None:
    match = re.match(r"([A-Za-z_]\w*)\(", trigger or "")
    return match.group(1) if match else None


def _load_state_dict(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load with torch's weights-only unpickler; return the name -> tensor map and a note on where it was."""
    import torch

    with path.open("rb") as handle:
        is_zip = handle.read(4) == TORCH_ZIP_MAGIC
    try:  # mmap: a zip checkpoint's tensors are read from the private copy, not held twice in memory
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:
        raise FormatRefused(f"{path.name}: torch's weights-only loader refused it: {_torch_reason(exc)}") from None
    note: dict[str, Any] = {}
    if isinstance(loaded, dict) and not _is_tensor_map(loaded):
        key = next((k for k in NESTED_STATE_DICT_KEYS if isinstance(loaded.get(k), dict)), None)
        if key is not None:
            left_out = sorted(str(k) for k in loaded if k != key)
            note = {"state_dict_key": key, **({"left_out": left_out[:20]} if left_out else {})}
            loaded = loaded[key]
    where = f"{path.name} [{note['state_dict_key']!r}]" if note else path.name
    if not isinstance(loaded, dict) or not loaded:
        what = "an empty dict" if isinstance(loaded, dict) else f"a {type(loaded).__name__}"
        raise FormatRefused(f"{where}: holds {what}, not a name -> tensor state dict; {NOT_WEIGHTS_HINT}")
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise FormatRefused(f"{where}: key {key!r} is not a string; tensor names must be strings")
        if not isinstance(value, torch.Tensor):
            raise FormatRefused(
                f"{where}: {key!r} is a {type(value).__name__}, not a tensor; only name -> tensor state dicts are "
                f"converted ({NOT_WEIGHTS_HINT})"
            )
    return _unshared(loaded, where), note


def _is_tensor_map(value: dict[Any, Any]) -> bool:
    import torch

    return bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _unshared(tensors: dict[str, Any], where: str) -> dict[str, Any]:
    """Plain, dense, contiguous tensors with storages of their own (tied weights are copied apart)."""
    import torch

    dtypes = {getattr(torch, n) for n in TORCH_DTYPES.values() if hasattr(torch, n)}
    out, seen = {}, set()
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise FormatRefused(f"{where}: tensor {name!r} is sparse or quantized ({tensor.layout}); not converted")
        if tensor.dtype not in dtypes:
            raise FormatRefused(f"{where}: tensor {name!r} has dtype {tensor.dtype}, which safetensors imports refuse")
        tensor = tensor.detach()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        out[name] = tensor
    return out


def _save(tensors: dict[str, Any], dst: Path, source: str) -> SafetensorsHeader:
    from safetensors.torch import save_file

    try:  # "format": "pt" is the metadata transformers' loaders expect in a torch safetensors file
        save_file(tensors, str(dst), metadata={"format": "pt"})
    except Exception as exc:
        raise FormatRefused(f"{source}: safetensors could not store the tensors: {exc}") from None
    return validate_safetensors_header(dst)


def _torch_reason(exc: Exception) -> str:
    """The line of torch's error that says what was refused, without its advice to load unsafely."""
    text = str(exc).strip()
    match = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    if match:
        return match.group(1).split(" Please use `torch.serialization", 1)[0][:500]
    return text.splitlines()[0][:500] if text else type(exc).__name__


def _is_pickle_index(name: str) -> bool:
    return any(name.endswith(f"{suffix}.index.json") for suffix in PICKLE_SUFFIXES)


def _sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
