"""The watermark hash: published MurmurHash3 vectors, our own frozen vectors, backend agreement
(Python ints vs torch int32 bit patterns), and the statistics a watermark relies on."""

from __future__ import annotations

import math
import random
import struct

import pytest
import torch

from kernels import watermark_hash as H

KEY = bytes(range(16))


def murmur3_bytes(data: bytes, seed: int = 0) -> int:
    assert len(data) % 4 == 0
    return H.murmur3_words(list(struct.unpack(f"<{len(data) // 4}I", data)), seed)


@pytest.mark.parametrize(
    ("data", "seed", "expected"),
    [  # MurmurHash3_x86_32 verification values (SMHasher / Wikipedia)
        (b"", 0, 0x00000000),
        (b"", 1, 0x514E28B7),
        (b"", 0xFFFFFFFF, 0x81F16F39),
        (b"\xff\xff\xff\xff", 0, 0x76293B50),
        (b"\x21\x43\x65\x87", 0, 0xF55B516B),
        (b"\x21\x43\x65\x87", 0x5082EDEE, 0x2362F9DE),
        (b"\x00\x00\x00\x00", 0, 0x2362F9DE),
    ],
)
def test_murmur3_matches_published_vectors(data: bytes, seed: int, expected: int) -> None:
    assert murmur3_bytes(data, seed) == expected


def test_frozen_vectors() -> None:
    """Changing the hash changes every deployed watermark: these values must never move."""
    words = H.key_words(KEY)
    assert words == (0x03020100, 0x07060504, 0x0B0A0908, 0x0F0E0D0C)
    assert [H.fmix32(x) for x in (0, 1, 0xFFFFFFFF, 0x12345678)] == [0, 0x514E28B7, 0x81F16F39, 0xE37CD1BC]
    assert H.token_mix(1) == 0x9E3779B1 and H.token_mix(0xFFFFFFFF) == 0x61C8864F
    assert H.gamma_threshold(0.25) == 1 << 30 and H.gamma_threshold(0.1) == 429496729
    tokens = torch.tensor([[0, 1, 2, 1000, 49151, 128255]])
    cases = {
        (1, (42,)): ((0xCCF5FD47, 0), [0xE76776F4, 0x6270F3E8, 0xDA232B26, 0x61184F0C, 0xC4C4DCC3, 0x4EE33666]),
        (1, (7, 8, 9)): ((0xF2E6C16B, 0), [0xC58B35EE, 0xC2E4B52B, 0x4CEF7CA2, 0x5E714553, 0x6B9C17D9, 0x558C9582]),
        (2, (101, 102, 103, 104)): (
            (0x48BBB067, 0x5088F15B),
            [0x48F72E4F, 0x225307EB, 0x6D9DB92E, 0x80577645, 0x0388C3FB, 0xB6F5CC7E],
        ),
        (2, ()): ((0x48BBB067, 0xFFFFFFFF), [0xBC03AEEF, 0x225307EB, 0x6D9DB92E, 0x80577645, 0x8600F545, 0x1C30DB00]),
        (3, (5, 6, 7, 8)): ((0xB029D29B, 0), [0xAFDB4394, 0x920F4502, 0x5A62C72C, 0x2289522A, 0x09939AAC, 0x0EF8A0CF]),
    }
    for (scheme, ctx), (state, values) in cases.items():
        assert H.row_state(scheme, words, ctx) == state
        got = H.element_values(scheme, H.u32_bits([state]).reshape(1, 2), tokens)
        assert H.u32_value(got)[0].tolist() == values, (scheme, ctx)


def _random_u32(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    edge = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0x80000001, 0xFFFFFFFE, 0xFFFFFFFF]
    return edge + [rng.getrandbits(32) for _ in range(n - len(edge))]


@pytest.mark.parametrize("n", [1, 7, 1003])  # odd lengths exercise torch's scalar tail loops
def test_leaves_agree_on_python_ints_and_int32_bits(n: int) -> None:
    a, b = _random_u32(n, 1), _random_u32(n, 2)[::-1]
    ta, tb = H.u32_bits(a), H.u32_bits(b)
    assert ta.dtype == torch.int32
    assert H.u32_value(H.fmix32(ta)).tolist() == [H.fmix32(x) for x in a]
    assert H.u32_value(H.token_mix(ta)).tolist() == [H.token_mix(x) for x in a]
    assert H.u32_value(H.murmur3_round(ta, tb)).tolist() == [H.murmur3_round(x, y) for x, y in zip(a, b)]
    assert H.u32_lt(ta, tb).tolist() == [x < y for x, y in zip(a, b)]
    assert H.u32_value(H.u32_min(ta, tb)).tolist() == [min(x, y) for x, y in zip(a, b)]
    # The per-element value equals the Python-int definition written out in full.
    state = H.row_state(2, H.key_words(KEY), [9, 99, 999])
    got = H.element_values(2, H.u32_bits([state]).reshape(1, 2), torch.tensor([a]) & 0x7FFFFFFF)
    own = [H.fmix32(state[0] ^ H.token_mix(v & 0x7FFFFFFF)) for v in a]
    want = [H.fmix32(min(o, state[1]) ^ H.token_mix(v & 0x7FFFFFFF)) for o, v in zip(own, a)]
    assert H.u32_value(got)[0].tolist() == want


def test_gumbel_uniform_is_exact_and_inside_the_open_interval() -> None:
    values = H.u32_bits(_random_u32(1000, 3))
    u = H.gumbel_uniform(values)
    want = [((v >> 9) * 2 + 1) / 2**24 for v in H.u32_value(values).tolist()]
    assert u.dtype == torch.float32 and u.double().tolist() == want  # no rounding happened
    extremes = H.gumbel_uniform(H.u32_bits([0, 0xFFFFFFFF]))
    assert extremes.tolist() == [2.0**-24, 1.0 - 2.0**-24]


def test_key_and_gamma_validation() -> None:
    with pytest.raises(ValueError):
        H.key_words(b"short")
    for gamma in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            H.gamma_threshold(gamma)


def _values(scheme: int, key: bytes, contexts: list[list[int]], vocab: int) -> torch.Tensor:
    states = [H.row_state(scheme, H.key_words(key), c) for c in contexts]
    return H.element_values(scheme, H.u32_bits(states).reshape(-1, 2), torch.arange(vocab)[None, :])


def _within_sigmas(observed: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize(("scheme", "width"), [(1, 1), (1, 3), (2, 4)])
@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_green_fraction_is_gamma(scheme: int, width: int, gamma: float) -> None:
    rng = random.Random(scheme * 10 + width)
    contexts = [[rng.randrange(50_000) for _ in range(width)] for _ in range(20)]
    values = _values(scheme, KEY, contexts, 50_000)  # 1e6 (context, token) pairs
    green = H.u32_lt(values, H.u32_bits(H.gamma_threshold(gamma)))
    assert _within_sigmas(green.double().mean().item(), gamma, green.numel())


def test_independence_across_keys_contexts_and_neighbouring_tokens() -> None:
    gamma, vocab = 0.25, 50_000
    threshold = H.u32_bits(H.gamma_threshold(gamma))
    agree = gamma**2 + (1 - gamma) ** 2  # two independent Bernoulli(gamma) agree this often
    for scheme, ctx_a, ctx_b in [(1, [17], [18]), (2, [1, 2, 3, 4], [5, 6, 7, 8])]:
        base = H.u32_lt(_values(scheme, KEY, [ctx_a], vocab), threshold)
        other_key = H.u32_lt(_values(scheme, bytes(16), [ctx_a], vocab), threshold)
        other_ctx = H.u32_lt(_values(scheme, KEY, [ctx_b], vocab), threshold)
        for other in (other_key, other_ctx):
            assert _within_sigmas((base == other).double().mean().item(), agree, vocab)
        both = (base[0, 1:] & base[0, :-1]).double().mean().item()
        assert _within_sigmas(both, gamma**2, vocab - 1)  # token v and v + 1 independent


def test_selfhash_colour_survives_edits_of_non_minimal_context_tokens() -> None:
    """Only the window minimum moves the seed: replacing a token whose hash is not the minimum by
    another such token leaves every candidate's colour as it was (the point of min-hash seeding)."""
    words = H.key_words(KEY)
    kh, _ = H.row_state(2, words, [])
    h = {t: H.fmix32(kh ^ H.token_mix(t)) for t in range(200)}
    ranked = sorted(h, key=h.get)
    ctx = [ranked[0], ranked[50], ranked[60], ranked[70]]  # ranked[0] holds the minimum
    edited = [ranked[0], ranked[150], ranked[60], ranked[70]]
    assert torch.equal(_values(2, KEY, [ctx], 5000), _values(2, KEY, [edited], 5000))
    moved = [ranked[1], ranked[50], ranked[60], ranked[70]]  # the minimum changed
    assert not torch.equal(_values(2, KEY, [ctx], 5000), _values(2, KEY, [moved], 5000))


@pytest.mark.parametrize("scheme", [1, 2, 3])
def test_vocab_values_equal_the_element_definition_and_leave_their_caches_alone(scheme: int) -> None:
    """The cached whole-vocabulary path (what the logits operation runs) against the general one, rows
    under one key and under several, called repeatedly (a cache written in place would show up here)."""
    rng = random.Random(scheme)
    keys = [KEY, KEY, bytes(range(16)), KEY, bytes(range(1, 17))]
    contexts = [[rng.randrange(49_152) for _ in range(4)] for _ in keys]
    states = H.u32_bits([H.row_state(scheme, H.key_words(k), c) for k, c in zip(keys, contexts, strict=True)])
    states = states.reshape(-1, 2)
    want = H.element_values(scheme, states, torch.arange(49_157)[None, :])
    for _ in range(3):
        assert torch.equal(H.vocab_values(scheme, states, 49_157), want)
        assert torch.equal(H.vocab_values(scheme, states[:2], 49_157), want[:2])  # one key: the shared vector
        assert torch.equal(H.vocab_values(scheme, states[2:3], 49_157), want[2:3])
