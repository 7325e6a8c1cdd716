"""`models import --convert-pickle`: a clean pickle becomes signed safetensors; a hostile one never runs or lands."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest

from server.registry import cli as registry
from server.registry.bom import PREFIX
from server.registry.convert import convert_folder, convert_pickle_to_safetensors, scan_pickle
from server.registry.format_policy import FormatRefused
from server.registry.store import BlobStore
from server.settings import load_settings
from tests.registry.conftest import SHARDS, build_model

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture
def settings(tmp_path):
    from server.storage.migrate import upgrade

    settings = load_settings(data_dir=tmp_path / "data", engine="fake")
    upgrade(settings.sqlalchemy_url)
    return settings


def cli(settings, capsys, command: str, *argv: str) -> tuple[int, str, str]:
    """Run one `python -m server models …` command against ``settings`` (a private data directory)."""
    from server.cli import build_parser

    args = build_parser().parse_args(["models", command, *argv])
    capsys.readouterr()
    rc = registry.run(getattr(registry, {"import": "import_model"}.get(command, command)), settings, args)
    out, err = capsys.readouterr()
    return rc, out, err


def tensors_of(folder: Path) -> dict:
    """Every tensor of the safetensors files in ``folder``."""
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(safetensors_torch.load_file(path))
    return found


def pickled_model(folder: Path, *, tie: bool = True) -> tuple[Path, dict]:
    """The synthetic model with its two safetensors shards replaced by one torch checkpoint (tied lm_head)."""
    build_model(folder)
    state = tensors_of(folder)
    if tie:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # shared storage: safetensors refuses aliasing
    for name in (*SHARDS, "model.safetensors.index.json"):
        (folder / name).unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder, state


def assert_nothing_stored(settings) -> None:
    store = BlobStore(settings.data_dir)
    assert os.listdir(store.tmp_dir) == []  # no staging folder left, converted or not
    assert not any(store.blobs_dir.iterdir())
    from server.registry import catalog
    from server.storage.db import Database

    db = Database(settings.sqlalchemy_url)
    try:
        with db.session() as session:
            assert catalog.list_models(session) == []
    finally:
        db.dispose()


class Payload:
    """Unpickling it runs ``command``: what a hostile checkpoint carries."""

    def __init__(self, command: str, how: str = "system") -> None:
        self.command, self.how = command, how

    def __reduce__(self):
        if self.how == "eval":
            return (eval, (f"__import__('os').system({self.command!r})",))
        return (os.system, (self.command,))


def test_clean_checkpoint_converts_imports_and_verifies(settings, capsys, tmp_path) -> None:
    folder, state = pickled_model(tmp_path / "model")
    digest = hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()

    rc, _, err = cli(settings, capsys, "import", "tiny", str(folder), "--json")
    assert rc == 1
    assert "pytorch_model.bin: pickle format .bin is refused (unpickling runs code)" in err
    assert "import with --convert-pickle" in err
    assert_nothing_stored(settings)

    rc, out, err = cli(settings, capsys, "import", "tiny", str(folder), "--convert-pickle", "--json")
    assert rc == 0, err
    view = json.loads(out)
    stored = Path(view["path"])
    assert sorted(p.name for p in stored.iterdir()) == sorted(
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    converted = tensors_of(stored)
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], v) and converted[k].dtype == v.dtype for k, v in state.items())
    assert safetensors_torch.safe_open(stored / "model.safetensors", "pt").metadata() == {"format": "pt"}
    record = view["provenance"]["converted_from_pickle"]
    assert record["pickles"] == [
        {
            "name": "pytorch_model.bin",
            "sha256": digest,
            "size_bytes": (folder / "pytorch_model.bin").stat().st_size,
            "tensors": 4,
        }
    ]
    assert record["safetensors"] == ["model.safetensors"] and record["scanner"].startswith("fickling ")
    assert "weights_only=True" in record["loader"]
    assert os.listdir(BlobStore(settings.data_dir).tmp_dir) == []

    rc, out, err = cli(settings, capsys, "verify", "tiny", "--version", view["version"])
    assert rc == 0 and out.startswith(f"OK: {stored} matches sha256:{view['digest']}"), err
    rc, out, _ = cli(settings, capsys, "bom", "tiny", "--version", view["version"])
    properties = {p["name"]: p["value"] for p in json.loads(out)["metadata"]["component"]["properties"]}
    assert json.loads(properties[f"{PREFIX}:provenance:converted_from_pickle"])["pickles"][0]["sha256"] == digest

    # The conversion is deterministic: converting again names the same bytes, so the same version.
    rc, out, _ = cli(settings, capsys, "import", "tiny", str(folder), "--convert-pickle", "--json")
    assert rc == 0 and json.loads(out)["digest"] == view["digest"] and json.loads(out)["version"] == view["version"]


def test_default_model_sharded_checkpoint(settings, capsys, tmp_path, default_model_dir) -> None:
    """The real default model, re-saved as two torch shards with their index, converts bit-exactly."""
    original = tensors_of(default_model_dir)
    folder = tmp_path / "smol"
    folder.mkdir()
    for path in default_model_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copyfile(path, folder / path.name)
    names = sorted(original)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in halves.items():
        torch.save({k: original[k] for k in keys}, folder / shard)
    index = {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))

    rc, out, err = cli(settings, capsys, "import", "smol", str(folder), "--convert-pickle", "--json")
    assert rc == 0, err
    view = json.loads(out)
    stored = Path(view["path"])
    names_stored = {p.name for p in stored.iterdir()}
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= names_stored
    assert "model.safetensors.index.json" in names_stored
    assert not any(n.endswith(".bin") or n.startswith("pytorch_model") for n in names_stored)
    weight_map = json.loads((stored / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map == {
        k: shard.replace("pytorch_", "").replace(".bin", ".safetensors") for k, shard in index["weight_map"].items()
    }
    converted = tensors_of(stored)
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    record = view["provenance"]["converted_from_pickle"]
    assert [p["name"] for p in record["pickles"]] == list(halves) and record["dropped"] == [
        "pytorch_model.bin.index.json"
    ]
    rc, out, err = cli(settings, capsys, "verify", "smol", "--version", view["version"])
    assert rc == 0, err


def _zip_with_payload(path: Path, payload: Payload) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "hook": payload}, path)


def _raw_pickle(path: Path, payload: Payload) -> None:
    path.write_bytes(pickle.dumps({"weight": payload}))


def _pickle_before_a_zip(path: Path, payload: Payload) -> None:
    """A polyglot: a zip reader sees a clean checkpoint, torch.load (no zip magic at byte 0) sees the pickle."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    path.write_bytes(pickle.dumps({"weight": payload}) + buffer.getvalue())
    assert zipfile.is_zipfile(path)


@pytest.mark.parametrize(
    ("name", "write", "how"),
    [
        ("evil.pkl", _raw_pickle, "system"),
        ("evil.pkl", _raw_pickle, "eval"),
        ("pytorch_model-extra.bin", _zip_with_payload, "system"),
        ("pytorch_model-extra.bin", _zip_with_payload, "eval"),
        ("consolidated.pth", _pickle_before_a_zip, "system"),
    ],
    ids=["raw-system", "raw-eval", "torch-zip-system", "torch-zip-eval", "pickle-before-zip"],
)
def test_malicious_pickle_is_refused_before_anything_loads(settings, capsys, tmp_path, name, write, how) -> None:
    folder, _ = pickled_model(tmp_path / "model")  # a clean checkpoint next to the hostile one
    marker = tmp_path / "pwned"
    write(folder / name, Payload(f"touch {marker}", how))

    rc, _, err = cli(settings, capsys, "import", "tiny", str(folder), "--convert-pickle")
    assert rc == 1
    assert err.startswith(f"error: {name}: pickle scan found ") and "MALICIOUS content, not converted" in err
    assert ("`from posix import system`" if how == "system" else "Call to `eval(") in err
    if write is _zip_with_payload:  # fickling's reason names the record of the archive it is in
        assert f"{name}:{Path(name).stem}/data.pkl:" in err
    assert "pytorch_model.bin:" not in err  # the clean file is not blamed
    assert err.rstrip().endswith("nothing was loaded")
    assert not marker.exists()
    assert_nothing_stored(settings)


def test_nested_pickle_loader_is_refused(tmp_path) -> None:
    """torch.storage._load_from_bytes is on fickling's ML allowlist but unpickles its argument unrestricted."""
    from torch.storage import _load_from_bytes

    marker = tmp_path / "pwned"
    inner = pickle.dumps(Payload(f"touch {marker}"))

    class Nested:
        def __reduce__(self):
            return (_load_from_bytes, (inner,))

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "x": Nested()}, path)
    with pytest.raises(FormatRefused, match=r"LIKELY_OVERTLY_MALICIOUS .*from torch.storage import _load_from_bytes"):
        convert_pickle_to_safetensors(path, tmp_path / "model.safetensors")
    assert not marker.exists() and not (tmp_path / "model.safetensors").exists()


def test_zip_with_two_data_records_is_refused(tmp_path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2)}, path)
    with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as archive:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name we are adding on purpose
        archive.writestr("pytorch_model/data.pkl", pickle.dumps({"w": Payload("true")}))
    scan = scan_pickle(path)
    assert not scan.safe and "more than once" in scan.findings[0]


def test_second_guard_torch_weights_only_loader(tmp_path) -> None:
    """fickling allowlists numpy's array rebuilder; torch's weights-only unpickler still refuses it."""
    np = pytest.importorskip("numpy")
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "n": np.ones(3)}, path)
    assert scan_pickle(path).safe
    with pytest.raises(FormatRefused, match=r"weights-only loader refused it: Unsupported global: .*_reconstruct"):
        convert_pickle_to_safetensors(path, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


def test_non_tensor_values_are_refused(tmp_path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "step": 3}, path)
    with pytest.raises(FormatRefused, match=r"pytorch_model.bin: 'step' is a int, not a tensor"):
        convert_pickle_to_safetensors(path, tmp_path / "model.safetensors")
    torch.save([torch.zeros(2)], path)
    with pytest.raises(FormatRefused, match=r"holds a list, not a name -> tensor state dict"):
        convert_pickle_to_safetensors(path, tmp_path / "model.safetensors")
    torch.save({"state_dict": {"w": torch.zeros(2), "inner": {"x": torch.ones(1)}}}, path)
    with pytest.raises(FormatRefused, match=r"\['state_dict'\]: 'inner' is a dict, not a tensor"):
        convert_pickle_to_safetensors(path, tmp_path / "model.safetensors")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_state_dict_nested_in_a_training_checkpoint(tmp_path, legacy: bool) -> None:
    source = build_model(tmp_path / "src")
    state = tensors_of(source)
    for name in (*SHARDS, "model.safetensors.index.json"):
        (source / name).unlink()
    checkpoint = {"state_dict": state, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}
    torch.save(checkpoint, source / "last.ckpt", _use_new_zipfile_serialization=not legacy)
    assert scan_pickle(source / "last.ckpt").safe
    record = convert_folder(source, tmp_path / "out")
    entry = record["pickles"][0]
    assert (entry["name"], entry["state_dict_key"], entry["left_out"]) == (
        "last.ckpt",
        "state_dict",
        ["epoch", "optimizer"],
    )
    converted = tensors_of(tmp_path / "out")
    assert all(torch.equal(converted[k], v) for k, v in state.items()) and converted.keys() == state.keys()
    assert not list((tmp_path / "out").glob("*.ckpt"))


def test_what_the_flag_does_not_convert(tmp_path) -> None:
    folder = build_model(tmp_path / "m")
    with pytest.raises(FormatRefused, match="holds no pickle weights"):
        convert_folder(folder, tmp_path / "out1")
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(FormatRefused, match="already holds safetensors weights"):
        convert_folder(folder, tmp_path / "out2")
    for name in (*SHARDS, "model.safetensors.index.json"):
        (folder / name).unlink()
    (folder / "arrays.npz").write_bytes(b"PK\x05\x06" + bytes(18))
    (folder / "sub").mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "sub" / "extra.pt")
    with pytest.raises(FormatRefused) as caught:
        convert_folder(folder, tmp_path / "out3")
    assert "arrays.npz: .npz is not a torch checkpoint" in caught.value.reason
    assert "sub/extra.pt: only weights at the top of the folder are converted" in caught.value.reason
    assert not (tmp_path / "out3").exists()


def test_two_files_holding_the_same_tensor_are_refused(tmp_path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"w": torch.zeros(2)}, folder / "a.bin")
    torch.save({"w": torch.ones(2)}, folder / "b.bin")
    with pytest.raises(FormatRefused, match=r"b.bin: tensors \['w'\] are also in another pickle file"):
        convert_folder(folder, tmp_path / "out")
