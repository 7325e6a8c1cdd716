"""The keyed integer hash behind the watermark, defined once on uint32 and run by three backends.

Every watermark decision is a function of (128-bit key, recent context tokens, candidate token id),
computed per element with 32-bit unsigned wrap-around arithmetic. No permutation, no device RNG: the
CPU reference, the Triton kernel and the detector compute the same integers.

Definition (uint32 values; `*` and `+` are modulo 2**32):

    fmix32(h)      MurmurHash3's finalizer: h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13;
                   h *= 0xC2B2AE35; h ^= h >> 16
    murmur3(ws)    MurmurHash3_x86_32 with seed 0 over the little-endian bytes of the words ws
    mix(t)         t * 0x9E3779B1 (golden-ratio multiply of a token id)
    k0..k3         the 16-byte key read as four little-endian uint32 words
    ctx_1..ctx_n   the last n = min(width, available) tokens before the candidate, oldest first

    lefthash (1)   seed = murmur3(k0, k1, k2, k3, 1, ctx_1..ctx_n);  value(v) = fmix32(seed ^ mix(v))
    gumbel   (3)   seed = murmur3(k0, k1, k2, k3, 3, ctx_1..ctx_n);  value(v) = fmix32(seed ^ mix(v))
    selfhash (2)   kh = murmur3(k0, k1, k2, k3, 2);  h(t) = fmix32(kh ^ mix(t))
                   m(v) = min(h(ctx_1), .., h(ctx_n), h(v));  value(v) = fmix32(m(v) ^ mix(v))

    KGW green       value(v) < threshold, threshold = floor(gamma * 2**32), compared as integers
    Gumbel uniform  u(v) = (2 * (value(v) >> 9) + 1) / 2**24, in (0, 1), exact in float32

`selfhash` is our keyed, permutation-free form of Kirchenbauer et al.'s "anchored min-hash with
self-salt" seeding: the seed is the minimum keyed hash over the context window *and the candidate
itself*, and the value is anchored on the candidate. Changing a context token moves the seed only if
that token held the minimum, which is what makes wider windows robust to edits. The flip side, as
in the paper's scheme: a candidate whose own hash is below the window's minimum (about 1 in n + 1)
gets a colour that depends on the key and the token only. The scheme number is hashed in, so one
key gives unrelated streams per scheme.

Three backends, one source: the leaves (`fmix32`, `murmur3_round`, `token_mix`) use only integer
operators and literal constants, and every right shift is masked to the bits a logical shift keeps.
So the same code is exact on Python ints in [0, 2**32), on Triton uint32 (through `triton.jit`),
and on torch int32 tensors holding uint32 bit patterns: there `*`, `+` and `<<` wrap modulo 2**32
in two's complement, `& 0xFFFFFFFF` becomes `& -1` (torch wraps Python scalars to the tensor's
dtype), and the masked arithmetic shift equals the logical one. Torch lacks uint32 arithmetic, and
int32 is half the bytes of int64 on CPU hosts. Unsigned comparison and minimum of such tensors are
spelled out below (`u32_lt`, `u32_min`). Signed int32 overflow is formally undefined in torch's
C++ kernels but wraps on the compilers and ISAs torch ships for; the tests check every leaf against
Python's unbounded ints (odd lengths included, for the scalar tail loops), so a torch release that
changed overflow or scalar wrapping would fail loudly, not silently. Leaves must
stay leaves (jit code calls only jit functions) and read no module globals (Triton accepts only
constexpr globals).

Split of the work: the per-row part (a murmur3 over at most 13 words) is computed once per row,
by `row_state` on Python ints for the torch path and by scalar code in the kernel; the per-element
part (`element_values`, one or two fmix32 per candidate) is where vectorization matters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

MASK32 = 0xFFFFFFFF
SIGN32 = -(1 << 31)  # int32 with only the sign bit set
N_KEY_WORDS = 4
GUMBEL_UNIT = 2.0**-24  # u = (2 * (value >> 9) + 1) * GUMBEL_UNIT


# --- leaves: shared verbatim with the Triton kernel -------------------------------------------------


def fmix32(h):
    """MurmurHash3's 32-bit finalizer: a bijection with full avalanche."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ ((h >> 16) & 0xFFFF)


def murmur3_round(h, k):
    """One 4-byte block of MurmurHash3_x86_32: scramble k, fold it into h."""
    k = (k * 0xCC9E2D51) & 0xFFFFFFFF
    k = ((k << 15) | ((k >> 17) & 0x7FFF)) & 0xFFFFFFFF
    k = (k * 0x1B873593) & 0xFFFFFFFF
    h = h ^ k
    h = ((h << 13) | ((h >> 19) & 0x1FFF)) & 0xFFFFFFFF
    return (h * 5 + 0xE6546B64) & 0xFFFFFFFF


def token_mix(t):
    """Golden-ratio multiply: spreads consecutive token ids over the 32-bit range."""
    return (t * 0x9E3779B1) & 0xFFFFFFFF


# --- per-row state on Python ints (a few words per row) ----------------------------------------------


def murmur3_words(words: Sequence[int], seed: int = 0) -> int:
    """MurmurHash3_x86_32 of the little-endian bytes of `words` (each in [0, 2**32))."""
    h = seed & MASK32
    for w in words:
        h = murmur3_round(h, w & MASK32)
    return fmix32(h ^ (4 * len(words)))


def row_state(scheme: int, key: Sequence[int], context: Sequence[int]) -> tuple[int, int]:
    """The two uint32 a row's per-element hash needs: (seed, 0) for lefthash and Gumbel, and
    (kh, min over the window of h(ctx_i)) for selfhash, 2**32 - 1 for an empty window.
    `key` holds the four key words, `context` the hashed window, oldest first."""
    if scheme == 2:
        kh = _selfhash_key(tuple(key))
        return kh, min((fmix32(kh ^ token_mix(t)) for t in context), default=MASK32)
    if scheme in (1, 3):
        return murmur3_words([*key, scheme, *context]), 0
    raise ValueError(f"no hash for scheme {scheme}")


@functools.lru_cache(maxsize=256)
def _selfhash_key(key: tuple[int, ...]) -> int:
    """kh = murmur3(k0, k1, k2, k3, 2), once per key (the torch path asks for it per row per step)."""
    return murmur3_words([*key, 2])


def key_words(key: bytes) -> tuple[int, int, int, int]:
    """The 128-bit watermark key as four little-endian uint32 words."""
    if len(key) != 4 * N_KEY_WORDS:
        raise ValueError("watermark key must be exactly 16 bytes")
    k0, k1, k2, k3 = (int.from_bytes(key[i : i + 4], "little") for i in range(0, 16, 4))
    return k0, k1, k2, k3


def gamma_threshold(gamma: float) -> int:
    """floor(gamma * 2**32): a token is green iff its value is below this (exact: 2**32 is a power of 2)."""
    if not 0.0 < gamma < 1.0:
        raise ValueError("gamma must lie strictly between 0 and 1")
    return max(1, min(MASK32, int(gamma * 2.0**32)))


# --- per-element values on torch int32 tensors holding uint32 bit patterns ---------------------------


def u32_bits(values) -> torch.Tensor:
    """uint32 values (Python ints or an int64 tensor in [0, 2**32)) as int32 bit patterns."""
    t = torch.as_tensor(values, dtype=torch.int64)
    return (t - ((t >> 31) << 32)).to(torch.int32)


def u32_value(bits: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns back to int64 values in [0, 2**32)."""
    return bits.to(torch.int64) & MASK32


def u32_lt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unsigned a < b on int32 bit patterns (flip the sign bit, compare signed)."""
    return (a ^ SIGN32) < (b ^ SIGN32)


def u32_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Unsigned minimum on int32 bit patterns."""
    return torch.minimum(a ^ SIGN32, b ^ SIGN32).bitwise_xor_(SIGN32)


def fmix32_(h: torch.Tensor) -> torch.Tensor:
    """`fmix32` on an int32 tensor of uint32 bit patterns, in place (returns `h`).

    The same operations as the shared leaf minus its `& 0xFFFFFFFF` after each multiply, which on int32
    is `& -1`: a full pass that changes nothing. The torch path's hot loop, so it counts passes.
    """
    h ^= (h >> 16) & 0xFFFF
    h *= 0x85EBCA6B
    h ^= (h >> 13) & 0x7FFFF
    h *= 0xC2B2AE35
    h ^= (h >> 16) & 0xFFFF
    return h


def element_values(scheme: int, state: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """value(v) of every candidate, int32 bits [N, K].

    `state` is int32 bits [N, 2] from `row_state` (all rows of one `scheme`); `candidates` holds
    token ids, [N, K] or [1, K] (broadcast, e.g. the whole vocabulary).
    """
    mixed = token_mix(candidates.to(torch.int32))
    first = state[:, :1]
    if scheme == 2:
        return selfhash_values(fmix32_(first ^ mixed), state[:, 1:], mixed)
    if scheme in (1, 3):
        return fmix32_(first ^ mixed)
    raise ValueError(f"no hash for scheme {scheme}")


def vocab_values(scheme: int, state: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`element_values` for the whole vocabulary, [N, vocab_size]: what the logits operation needs per step.

    Faster than `element_values(scheme, state, arange(vocab)[None])` on CPU, with the same integers: the
    token mix of the vocabulary is cached, and so is selfhash's h(v) = fmix32(kh ^ mix(v)), which depends
    on the key alone (one vector per key, shared by every row and step under that key).
    """
    device = state.device
    mixed = _vocab_mix(vocab_size, device)
    first = state[:, :1]
    if scheme == 2:
        keys = first[:, 0].tolist()
        if len(set(keys)) == 1:
            own = _own_hashes(keys[0], vocab_size, device)[None, :]
        else:
            own = torch.stack([_own_hashes(k, vocab_size, device) for k in keys])
        return selfhash_values(own, state[:, 1:], mixed)
    if scheme in (1, 3):
        return fmix32_(first ^ mixed)
    raise ValueError(f"no hash for scheme {scheme}")


def selfhash_values(own: torch.Tensor, window_min: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """fmix32(umin(h(v), window minimum) ^ mix(v)), computed into a fresh tensor. With `own` all ones and the
    row's seed as `window_min` it is lefthash's and Gumbel's value (umin gives the seed)."""
    return fmix32_(u32_min(own, window_min).bitwise_xor_(mixed))


@functools.lru_cache(maxsize=8)
def _vocab_mix(vocab_size: int, device: torch.device) -> torch.Tensor:
    return token_mix(torch.arange(vocab_size, dtype=torch.int32, device=device))[None, :]


@functools.lru_cache(maxsize=64)
def _own_hashes(kh_bits: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """h(v) for every token under one key (`kh_bits`: the key's selfhash state, int32 bits). 64 keys of a
    128k vocabulary hold 32 MiB."""
    kh = torch.tensor(kh_bits, dtype=torch.int32, device=device)
    return fmix32_(kh ^ _vocab_mix(vocab_size, device)[0])


def gumbel_uniform(values: torch.Tensor) -> torch.Tensor:
    """u = (2 * (value >> 9) + 1) / 2**24 as float32: the odd integer is < 2**24, so exact."""
    return (((values >> 9) & 0x7FFFFF) * 2 + 1).to(torch.float32) * GUMBEL_UNIT
