"""`detect_cli`: the operator's detection, through the model's tokenizer (text in, JSON out)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from server.identity.secrets import Keyring, load_master_secret
from server.settings import load_settings
from server.storage.db import Database
from server.storage.migrate import upgrade
from server.watermark.cli import detect_cli
from server.watermark.keys import WatermarkKeyring
from server.watermark.processor import BatchWatermarker
from server.watermark.request import watermark_extra_args
from server.watermark.settings import WatermarkSettings
from tests.watermark.conftest import installed_channel, sample_like_vllm


@pytest.fixture
def settings(tmp_path, default_model_dir):
    settings = load_settings(data_dir=tmp_path, engine="fake", models=[{"name": "m", "path": str(default_model_dir)}])
    upgrade(settings.sqlalchemy_url)
    return settings


def _default_key(settings):
    db = Database(settings.sqlalchemy_url)
    try:
        keys = WatermarkKeyring(db, Keyring(load_master_secret(settings)), WatermarkSettings())
        return keys.ensure_default_key()
    finally:
        db.dispose()


def _word_text(model_dir: Path, sealer, key, n: int) -> str:
    """Sample n whole-word tokens (" word", stable under re-tokenization) through the watermarker."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    words = [i for t, i in tok.get_vocab().items() if re.fullmatch(r"Ġ[a-z]{3,}", t)]
    allowed = torch.full((len(tok),), float("-inf"))
    allowed[words] = 0.0
    gen = torch.Generator().manual_seed(0)
    out: list[int] = []
    channel = installed_channel()
    batch = BatchWatermarker(sealer, channel=channel)
    if key is not None:
        batch.add(0, watermark_extra_args(key, 1.0, sealer), out)
    for _ in range(n):
        logits = torch.randn(1, len(tok), generator=gen) * 2.5 + allowed
        batch.apply(logits)
        out.append(int(sample_like_vllm(logits, 1.0, channel, gen)[0]))
    return tok.decode(out)


def test_detects_watermarked_text_and_not_plain_text(settings, sealer, tmp_path, default_model_dir):
    key = _default_key(settings)
    marked, plain = tmp_path / "marked.txt", tmp_path / "plain.txt"
    marked.write_text(_word_text(default_model_dir, sealer, key, 200))
    plain.write_text(_word_text(default_model_dir, sealer, None, 120))
    out = io.StringIO()
    assert detect_cli(settings, "m", marked, out=out) == 0
    found = json.loads(out.getvalue())
    assert found["detected"] and found["key_id"] == key.key_id
    out = io.StringIO()
    assert detect_cli(settings, "m", plain, out=out) == 1
    assert json.loads(out.getvalue())["detected"] is False


def test_bad_inputs_exit_2(settings, tmp_path):
    assert detect_cli(settings, "nope", tmp_path / "x.txt") == 2
    assert detect_cli(settings, "m", tmp_path / "missing.txt") == 2
