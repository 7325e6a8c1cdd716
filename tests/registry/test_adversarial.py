"""The adversarial suite: every tampering of a signed model is refused, and the reason names what happened."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from jinja2.sandbox import SecurityError

from server.registry.convert import convert_pickle_to_safetensors, scan_pickle
from server.registry.format_policy import (
    FormatRefused,
    check_folder,
    render_chat_template_sandboxed,
)
from server.registry.signing import VerificationFailed, sign_folder, verify_folder
from server.registry.store import BlobStore
from tests.registry.conftest import SHARDS, build_model, safetensors_bytes

FILES = (
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    *SHARDS,
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


@pytest.fixture
def signed(model: Path, keys, tmp_path) -> tuple[Path, Path]:
    signature = tmp_path / "model.sig"
    sign_folder(model, keys["pinned"], signature)
    return model, signature


def refused(folder: Path, signature: Path, keys, **kwargs) -> str:
    with pytest.raises(VerificationFailed) as caught:
        verify_folder(folder, signature, [keys["pinned_pub"]], **kwargs)
    return caught.value.reason


def test_signed_model_verifies(signed, keys) -> None:
    folder, signature = signed
    manifest = verify_folder(folder, signature, [keys["pinned_pub"]])
    assert sorted(f.path for f in manifest.files) == sorted(FILES)


@pytest.mark.parametrize("name", FILES)
def test_one_flipped_byte_in_any_file(signed, keys, name: str) -> None:
    folder, signature = signed
    path = folder / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert f"modified: {name}" in refused(folder, signature, keys)


def test_file_added(signed, keys) -> None:
    folder, signature = signed
    (folder / "added_tokens.json").write_text("{}")
    assert "not covered by the signature: added_tokens.json" in refused(folder, signature, keys)


def test_file_deleted(signed, keys) -> None:
    folder, signature = signed
    (folder / "tokenizer.json").unlink()
    assert "missing: tokenizer.json" in refused(folder, signature, keys)


def test_file_renamed(signed, keys) -> None:
    folder, signature = signed
    (folder / "chat_template.jinja").rename(folder / "template.jinja")
    assert "renamed: chat_template.jinja -> template.jinja" in refused(folder, signature, keys)


def test_file_replaced_by_symlink(signed, keys, tmp_path) -> None:
    folder, signature = signed
    outside = tmp_path / "config-copy.json"
    shutil.copy(folder / "config.json", outside)  # same bytes: only the link itself is wrong
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(outside)
    assert "config.json is a symlink" in refused(folder, signature, keys)


def test_symlinked_directory_escaping_the_folder(signed, keys, tmp_path) -> None:
    folder, signature = signed
    (folder / "extra").symlink_to(tmp_path, target_is_directory=True)
    assert "extra is a symlink" in refused(folder, signature, keys)


def test_two_shards_swapped(signed, keys) -> None:
    folder, signature = signed
    first, second = (folder / s for s in SHARDS)
    first.rename(folder / "tmp")
    second.rename(first)
    (folder / "tmp").rename(second)
    assert f"swapped: {SHARDS[0]} <-> {SHARDS[1]}" in refused(folder, signature, keys)


def test_signature_truncated(signed, keys) -> None:
    folder, signature = signed
    signature.write_bytes(signature.read_bytes()[:200])
    assert "corrupt or truncated" in refused(folder, signature, keys)


def test_signature_absent(signed, keys) -> None:
    folder, signature = signed
    signature.unlink()
    assert "no signature at" in refused(folder, signature, keys)


def test_signature_of_another_model(signed, keys, tmp_path) -> None:
    folder, _ = signed
    other = build_model(tmp_path / "other", seed=7)
    other_signature = tmp_path / "other.sig"
    sign_folder(other, keys["pinned"], other_signature)  # valid, by the pinned key, for other bytes
    reason = refused(folder, other_signature, keys)
    assert "does not match its signature" in reason and f"modified: {SHARDS[0]}" in reason


def test_signed_by_an_unpinned_key(model, keys, tmp_path) -> None:
    signature = tmp_path / "model.sig"
    sign_folder(model, keys["other"], signature)
    assert "which is not pinned" in refused(model, signature, keys)


def test_unpinned_signer_claiming_the_pinned_key(model, keys, tmp_path) -> None:
    """A forged key hint only selects the pinned key; the ECDSA check with it then fails."""
    signature = tmp_path / "model.sig"
    sign_folder(model, keys["other"], signature)
    pinned = json.loads(Path(str(signature)).read_text())
    pinned_hint = _hint(tmp_path, keys["pinned"])
    pinned["verificationMaterial"]["publicKey"]["hint"] = pinned_hint
    signature.write_text(json.dumps(pinned))
    assert "does not verify with the pinned signer" in refused(model, signature, keys)


def test_signature_without_signer_hint(signed, keys) -> None:
    folder, signature = signed
    bundle = json.loads(signature.read_text())
    bundle["verificationMaterial"]["publicKey"]["hint"] = ""
    signature.write_text(json.dumps(bundle))
    assert "names no signer key" in refused(folder, signature, keys)


def test_altered_payload_under_a_valid_signature(signed, keys) -> None:
    folder, signature = signed
    bundle = json.loads(signature.read_text())
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    payload["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    signature.write_text(json.dumps(bundle))
    assert "does not verify with the pinned signer" in refused(folder, signature, keys)


@pytest.mark.parametrize("name", ["../outside.json", "/etc/passwd"])
def test_signature_naming_a_path_outside_the_folder(signed, keys, name: str) -> None:
    """Even a pinned signer cannot make us read outside the folder (a compromised key, a buggy signer)."""
    folder, signature = signed
    _resign_payload(
        signature,
        keys["pinned"],
        lambda p: p["predicate"]["resources"].append({"name": name, "algorithm": "sha256", "digest": "0" * 64}),
    )
    assert "outside the model folder" in refused(folder, signature, keys)


def test_signature_allowing_symlinks_is_refused(signed, keys) -> None:
    folder, signature = signed
    _resign_payload(signature, keys["pinned"], lambda p: p["predicate"]["serialization"].update(allow_symlinks=True))
    assert "only per-file SHA-256 is accepted" in refused(folder, signature, keys)


def test_folder_changed_after_verification(signed, keys) -> None:
    folder, signature = signed
    manifest = verify_folder(folder, signature, [keys["pinned_pub"]])
    (folder / SHARDS[1]).write_bytes((folder / SHARDS[1]).read_bytes())  # same bytes, rewritten
    with pytest.raises(VerificationFailed, match="changed after verification"):
        manifest.assert_unchanged()


def test_pickle_with_a_malicious_payload(tmp_path, model) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = model / "pytorch_model.bin"
    evil.write_bytes(pickle.dumps({"weight": Payload()}))
    assert any("pytorch_model.bin: pickle format .bin is refused" in r for r in check_folder(model))
    with pytest.raises(FormatRefused, match="pytorch_model.bin"):
        BlobStore(tmp_path / "data").import_folder(model)
    scan = scan_pickle(evil)
    assert not scan.safe and scan.severity == "LIKELY_OVERTLY_MALICIOUS"
    assert any("system" in finding for finding in scan.findings)
    with pytest.raises(FormatRefused, match="pickle scan found LIKELY_OVERTLY_MALICIOUS"):
        convert_pickle_to_safetensors(evil, tmp_path / "converted.safetensors")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "converted.safetensors").exists()


def test_safetensors_header_lying_about_offsets(model, tmp_path) -> None:
    tensors = {"a": ("F32", [2], b"\0" * 8), "b": ("F32", [2], b"\0" * 8)}
    lying = {  # b claims bytes that overlap a, leaving the last 4 bytes unaccounted for
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    (model / SHARDS[0]).write_bytes(safetensors_bytes(tensors, header=lying))
    assert any("tensor 'b' data_offsets [4, 12] overlaps the previous tensor" in r for r in check_folder(model))
    with pytest.raises(FormatRefused, match="overlaps"):
        BlobStore(tmp_path / "data").import_folder(model)


def test_folder_with_auto_map_and_python_file(model) -> None:
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text("import os\nos.system('id')\n")
    reasons = check_folder(model)
    assert "config.json: auto_map is a remote-code hook; model folders must not carry code" in reasons
    assert "modeling_evil.py: code files are refused (trust_remote_code is always off)" in reasons


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('touch /tmp/escaped').read() }}",
        "{{ joiner.__init__.__globals__['__builtins__']['__import__']('os').system('id') }}",
        "{{ '{0.__class__.__base__.__subclasses__}'.format(messages) }}",
        "{% set x = messages.append({'role': 'system', 'content': 'injected'}) %}",
    ],
)
def test_chat_template_escaping_the_sandbox(model, template: str) -> None:
    with pytest.raises(SecurityError):
        render_chat_template_sandboxed(template, [{"role": "user", "content": "hi"}])
    (model / "chat_template.jinja").write_text(template)
    assert any("chat_template.jinja: chat template tries to escape the Jinja sandbox" in r for r in check_folder(model))


def _hint(tmp_path: Path, private_key: Path) -> str:
    from server.registry.signing import private_key_fingerprint

    return private_key_fingerprint(private_key)


def _resign_payload(signature: Path, private_key: Path, change) -> None:
    """Rewrite the statement and sign it again with ``private_key``, as a pinned but hostile signer would."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from model_signing._signing.sign_sigstore_pb import pae

    bundle = json.loads(signature.read_text())
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    change(payload)
    resources = payload["predicate"]["resources"]
    import hashlib

    payload["subject"][0]["digest"]["sha256"] = hashlib.sha256(
        b"".join(bytes.fromhex(r["digest"]) for r in resources)
    ).hexdigest()
    raw = json.dumps(payload).encode()
    key = serialization.load_pem_private_key(private_key.read_bytes(), None)
    sig = key.sign(pae(raw), ec.ECDSA(hashes.SHA256()))
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(raw).decode()
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(sig).decode()
    signature.write_text(json.dumps(bundle))
