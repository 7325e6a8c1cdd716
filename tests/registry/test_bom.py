"""The AI-BOM validates against CycloneDX 1.6, names the digest the signature covers, and is signed."""

from __future__ import annotations

import json

import pytest

from server.registry.bom import (
    BomInvalid,
    bom_bytes,
    bom_model_digest,
    build_bom,
    sign_bom,
    validate_bom,
    verify_bom,
)
from server.registry.digest import digest_folder
from server.registry.signing import VerificationFailed, sign_folder, verify_folder

PROVENANCE = {
    "source": "https://huggingface.co/example/tiny-llama",
    "base_model": "example/tiny-llama-base",
    "datasets": ["example/pretraining-mix", {"name": "example/sft", "url": "https://example.org/sft"}],
}


@pytest.fixture
def bom(model) -> dict:
    digest = digest_folder(model)
    return build_bom(
        name="tiny", version="v1", root=digest.root, files=digest.files, folder=model, provenance=PROVENANCE
    )


def test_bom_validates_and_names_the_signed_digest(bom, model, keys, tmp_path) -> None:
    validate_bom(bom)
    signature = tmp_path / "model.sig"
    sign_folder(model, keys["pinned"], signature)
    manifest = verify_folder(model, signature, [keys["pinned_pub"]])
    assert bom_model_digest(bom) == manifest.root
    subject = bom["metadata"]["component"]
    assert subject["type"] == "machine-learning-model" and subject["hashes"][0]["content"] == manifest.root
    files = {c["name"]: c["hashes"][0]["content"] for c in subject["components"]}
    assert files == {f.path: f.sha256 for f in manifest.files}


def test_model_card(bom) -> None:
    card = bom["metadata"]["component"]["modelCard"]
    assert card["modelParameters"]["modelArchitecture"] == "LlamaForCausalLM"
    assert card["modelParameters"]["architectureFamily"] == "llama"
    assert [d["name"] for d in card["modelParameters"]["datasets"]] == ["example/pretraining-mix", "example/sft"]
    props = {p["name"]: p["value"] for p in card["properties"]}
    assert props["secure-model-server:parameters"] == str(32 * 16 * 2 + 16 * 16 * 2)
    assert props["secure-model-server:weight-dtypes"] == "BF16=1536"
    assert props["secure-model-server:quantization"] == "none"
    subject = bom["metadata"]["component"]
    assert subject["pedigree"]["ancestors"][0]["name"] == "example/tiny-llama-base"
    assert subject["externalReferences"][0]["url"] == PROVENANCE["source"]
    names = {c["name"] for c in bom["components"]}
    assert {"secure-model-server", "model-signing", "safetensors"} <= names


def test_container_image_digest(model, monkeypatch) -> None:
    image = "sha256:" + "ab" * 32
    monkeypatch.setenv("CONTAINER_IMAGE_DIGEST", image)
    digest = digest_folder(model)
    bom = build_bom(name="tiny", version="v1", root=digest.root, files=digest.files, folder=model)
    validate_bom(bom)
    assert {"name": "secure-model-server:container-image-digest", "value": image} in bom["metadata"]["properties"]


def test_invalid_bom_is_refused(bom) -> None:
    bom["metadata"]["component"]["type"] = "weights"
    with pytest.raises(BomInvalid, match="CycloneDX 1.6"):
        validate_bom(bom)
    del bom["metadata"]["component"]["type"]
    bom["metadata"]["component"]["surprise"] = 1  # the strict schema refuses unknown properties
    with pytest.raises(BomInvalid):
        validate_bom(bom)


def test_bom_signature(bom, keys) -> None:
    data = bom_bytes(bom)
    signature = sign_bom(data, keys["pinned"])
    verify_bom(data, signature, [keys["pinned_pub"]])
    tampered = json.loads(data)
    tampered["metadata"]["component"]["properties"][0]["value"] = "0" * 64
    with pytest.raises(VerificationFailed, match="altered"):
        verify_bom(bom_bytes(tampered), signature, [keys["pinned_pub"]])
    with pytest.raises(VerificationFailed, match="not pinned"):
        verify_bom(data, sign_bom(data, keys["other"]), [keys["pinned_pub"]])
