"""The `_wm` format: produced only by the server, refused when malformed, forged or tampered with."""

from __future__ import annotations

import copy
import os

import pytest

from kernels.watermark_params import DEFAULT_WIDTH, W_MAX, Scheme
from server.watermark import transport, types
from server.watermark.request import EXTRA_ARGS_KEY, header_value, parse_wm, watermark_extra_args
from server.watermark.transport import KeySealer, TransportKeyMissing
from tests.watermark.conftest import material


def test_scheme_numbers_mirror_the_kernel():
    assert types.KGW_LEFTHASH == Scheme.KGW_LEFTHASH
    assert types.KGW_SELFHASH == Scheme.KGW_SELFHASH
    assert types.GUMBEL == Scheme.GUMBEL
    assert types.KGW_GATED not in set(Scheme)  # a selfhash row with a gate in the kernel
    assert types.KGW_GATED_KERNEL_SCHEME == Scheme.KGW_SELFHASH
    kernel_widths = {int(k): v for k, v in DEFAULT_WIDTH.items()}
    assert kernel_widths == {k: v for k, v in types.DEFAULT_WIDTH.items() if k != types.KGW_GATED}
    assert types.DEFAULT_WIDTH[types.KGW_GATED] == kernel_widths[types.KGW_GATED_KERNEL_SCHEME]
    assert types.MAX_WIDTH == W_MAX


def test_round_trip_and_resolved_scheme(sealer):
    key = material("auto")
    sampled = parse_wm(watermark_extra_args(key, 0.7, sealer), sealer)
    assert (sampled.scheme, sampled.key, sampled.width, sampled.temperature) == (Scheme.GUMBEL, key.key, 4, 0.7)
    greedy = parse_wm(watermark_extra_args(key, 0.0, sealer), sealer)
    assert (greedy.scheme, greedy.gate) == (types.KGW_GATED, key.gate)  # Gumbel-max needs randomness
    assert sampled.gate == 0.0 and sampled.warmup == 0
    ungated = parse_wm(watermark_extra_args(material("auto", gate=0.0), 0.0, sealer), sealer)
    assert ungated.scheme == Scheme.KGW_SELFHASH  # an auto key made before gating: plain selfhash, named so
    lefthash = parse_wm(watermark_extra_args(material("kgw-lefthash"), 1.0, sealer), sealer)
    assert (lefthash.scheme, lefthash.width) == (Scheme.KGW_LEFTHASH, 1)
    assert parse_wm(None, sealer) is None and parse_wm({"other": 1}, sealer) is None


def test_no_key_material_in_extra_args_reprs_or_header(sealer):
    key = material()
    extra = watermark_extra_args(key, 1.0, sealer)
    for text in (repr(extra), repr(key), repr(parse_wm(extra, sealer)), header_value(key)):
        assert key.key.hex() not in text and repr(key.key) not in text
    assert header_value(key) == f"kgw-selfhash; key-id={key.key_id}"
    assert header_value(material("auto"), 0.0).startswith("kgw-gated;")
    assert header_value(material("auto", gate=0.0), 0.0).startswith("kgw-selfhash;")
    assert header_value(material("auto"), 1.0).startswith("gumbel;")
    assert header_value(None) == "off; reason=exempt"
    assert header_value(None, off="engine") == "off; reason=engine"
    with pytest.raises(ValueError):
        header_value(None, off="because")


@pytest.mark.parametrize(
    "field, value",
    [
        ("d", 0.0001),  # weaken the watermark
        ("g", 0.5),
        ("w", 1),
        ("s", 1),
        ("t", 0.5),
        ("id", "wk_ffffffffffff"),  # relabel the key
    ],
)
def test_tampering_with_any_field_breaks_the_handle(sealer, field, value):
    extra = watermark_extra_args(material(), 1.0, sealer)
    extra[EXTRA_ARGS_KEY][field] = value
    with pytest.raises(ValueError):
        parse_wm(extra, sealer)


@pytest.mark.parametrize("field, value", [("q", 0.9), ("q", 0.21), ("a", 3), ("s", 2), ("d", 1.0)])
def test_tampering_with_a_gated_entry_breaks_the_handle(sealer, field, value):
    extra = watermark_extra_args(material("auto", warmup=8), 0.0, sealer)
    assert parse_wm(extra, sealer).warmup == 8
    extra[EXTRA_ARGS_KEY][field] = value
    with pytest.raises(ValueError):
        parse_wm(extra, sealer)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.update(x=1),
        lambda e: e.pop("k"),
        lambda e: e.update(v=1),
        lambda e: e.update(v=3),
        lambda e: e.update(v=True),
        lambda e: e.update(s=0),
        lambda e: e.update(s=4),  # kgw-gated needs a gate
        lambda e: e.update(s=5),
        lambda e: e.update(q=0.5),  # a gate on a selfhash entry
        lambda e: e.update(a=-1),
        lambda e: e.update(q="0.2"),
        lambda e: e.update(s="2"),
        lambda e: e.update(w=0),
        lambda e: e.update(w=9),
        lambda e: e.update(w=4.0),
        lambda e: e.update(g=1.0),
        lambda e: e.update(g=float("nan")),
        lambda e: e.update(d=-2.0),
        lambda e: e.update(d=float("inf")),
        lambda e: e.update(t=-1.0),
        lambda e: e.update(id="../etc"),
        lambda e: e.update(k="x" * 1000),
        lambda e: e.update(k="v1.AAAA"),
        lambda e: e.update(k=None),
    ],
)
def test_malformed_entries_are_refused(sealer, mutate):
    extra = watermark_extra_args(material(), 1.0, sealer)
    mutate(extra[EXTRA_ARGS_KEY])
    with pytest.raises(ValueError):
        parse_wm(extra, sealer)


def test_not_an_object_and_gumbel_at_zero_temperature_are_refused(sealer):
    with pytest.raises(ValueError):
        parse_wm({EXTRA_ARGS_KEY: "kgw"}, sealer)
    extra = watermark_extra_args(material("gumbel"), 1.0, sealer)
    extra[EXTRA_ARGS_KEY]["t"] = 0.0
    with pytest.raises(ValueError):
        parse_wm(extra, sealer)


def test_a_handle_from_another_process_tree_does_not_open(sealer):
    extra = watermark_extra_args(material(), 1.0, sealer)
    with pytest.raises(ValueError):
        parse_wm(copy.deepcopy(extra), KeySealer(os.urandom(32)))


def test_transport_key_is_created_once_and_required_by_engines():
    env: dict[str, str] = {}
    with pytest.raises(TransportKeyMissing):
        transport.current_sealer(env)
    first = transport.install_transport_key(env)
    assert transport.install_transport_key(env) is first and transport.current_sealer(env) is first
    handle = first.seal(b"k" * 16, "aad")
    assert transport.current_sealer(dict(env)).open(handle, "aad") == b"k" * 16
    assert "transport key" in repr(first) and env[transport.ENV_VAR] not in repr(first)
