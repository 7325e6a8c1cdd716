"""Watermark logits operation: public API and the plain-torch reference (what CPU hosts run).

    apply_watermark(logits, batch)  in place; Triton on CUDA tensors, else the torch path: fused by Inductor
                                    (`kernels.watermark_cpu`) once compiled, the eager reference until then

Per row (hash and scheme definitions in `kernels.watermark_hash`):
  KGW (lefthash, selfhash)  logits[v] += delta where value(v) < threshold; every other logit keeps
                            its bits. bf16 logits are added in fp32 and rounded once (to nearest
                            even). NaN logits are never modified.
  Gumbel (exponential-minimum sampling as a logits operation)
                            w = argmax_v (logits[v] * fl(1/T) + g(v)), g = -log(-log(u(v))), ties
                            to the lowest index; logits[w] keeps its bits, every other logit becomes -inf.
                            g is Gumbel(0, 1) noise up to the 2**-23 resolution of u (so g <= 16.6),
                            hence w is a sample of softmax(logits / T) and the sampler downstream has
                            one choice left: a distortion-free watermark.
                            A NaN logit never wins (its score counts as -inf).
  OFF, or skip=1            untouched, bit for bit.

Exactness: value(v), green masks, u(v) and KGW outputs are integer-derived or one IEEE add, so the
torch path and the Triton kernel agree bit for bit. The Gumbel *choice* goes through float `log`,
which is not correctly rounded on either device (Sleef/libm on CPU, libdevice on CUDA, numpy in the
interpreter) and can differ by an ulp: the chosen token can differ between devices only when the top
two perturbed scores lie within a few ulp (~1e-7 relative) of each other. The detector reads u of
the emitted token, which is exact, so detection is unaffected either way.

Integration (vLLM 0.32): custom logits processors run before penalties and temperature, so logits
arrive unscaled and a Gumbel row carries its own temperature; whatever runs after (penalties,
top-k/top-p) sees a single finite logit and must leave it the choice. The CPU (V1) runner and the
CUDA runner call the same `apply_watermark`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import watermark_cpu
from kernels import watermark_hash as H
from kernels.watermark_params import COL_CONTEXT, COL_CTX_LEN, COL_KEY, COL_SCHEME, COL_SKIP, Scheme, WatermarkBatch

__all__ = [
    "apply_watermark",
    "apply_watermark_reference",
    "green_mask",
    "gumbel_u",
    "kgw_green",
    "row_values",
]


def apply_watermark(logits: torch.Tensor, batch: WatermarkBatch) -> None:
    """Apply every row's watermark to `logits` [B, V] in place (one launch, two with Gumbel rows)."""
    _check(logits, batch)
    if not batch.any_active:
        return
    if logits.is_cuda:
        try:
            from kernels.watermark_triton import apply_watermark_triton
        except ImportError:  # a CUDA host without Triton still gets the right answer
            pass
        else:
            apply_watermark_triton(logits, batch)
            return
    _apply_torch(logits, batch, fused=watermark_cpu.applies_to(logits))


def apply_watermark_reference(logits: torch.Tensor, batch: WatermarkBatch) -> None:
    """The plain-torch definition of the operation. Per-row seeds on the host (a few words each),
    per-element work vectorized over all rows of one scheme and the whole vocabulary."""
    _check(logits, batch)
    if batch.any_active:
        _apply_torch(logits, batch, fused=False)


def _apply_torch(logits: torch.Tensor, batch: WatermarkBatch, fused: bool) -> None:
    """The reference (`fused` False) or the same operation through `kernels.watermark_cpu`'s fused loops."""
    table = batch.table.cpu()
    states = _row_states(table).to(logits.device)
    params = WatermarkBatch(table.to(logits.device), batch.has_gumbel, batch.any_active)
    schemes = params.effective_scheme()
    for scheme in (Scheme.KGW_LEFTHASH, Scheme.KGW_SELFHASH, Scheme.GUMBEL):
        rows = (schemes == scheme).nonzero().flatten()
        if rows.numel() == 0:
            continue
        every_row = rows.numel() == logits.shape[0]
        x = logits if every_row else logits[rows]  # a view (written in place) or a copy
        if scheme is Scheme.GUMBEL:
            u = watermark_cpu.gumbel_uniform(states[rows], logits.shape[1]) if fused else None
            if u is None:
                u = H.gumbel_uniform(H.vocab_values(scheme, states[rows], logits.shape[1]))
            x.copy_(_gumbel_choose(x, u, params.temperature()[rows]))
        elif not (
            fused
            and watermark_cpu.apply_kgw(
                x, states[rows], scheme is Scheme.KGW_SELFHASH, params.threshold()[rows], params.delta()[rows]
            )
        ):
            values = H.vocab_values(scheme, states[rows], logits.shape[1])
            green = H.u32_lt(values, params.threshold()[rows, None]) & (x == x)  # NaN: never written
            bumped = (x.float() + params.delta()[rows, None]).to(x.dtype)
            x.copy_(torch.where(green, bumped, x))  # a select: unchosen logits keep their bits (-0.0, NaN)
        if not every_row:
            logits[rows] = x


def _row_states(table: torch.Tensor) -> torch.Tensor:
    """int32 bits [B, 2]: `row_state` of every active row (zeros elsewhere), from a CPU table."""
    states = []
    for row in table.tolist():
        scheme = row[COL_SCHEME] if not row[COL_SKIP] else Scheme.OFF
        if scheme == Scheme.OFF:
            states.append((0, 0))
            continue
        key = [w & H.MASK32 for w in row[COL_KEY : COL_KEY + 4]]
        states.append(H.row_state(scheme, key, row[COL_CONTEXT : COL_CONTEXT + row[COL_CTX_LEN]]))
    return H.u32_bits(states).reshape(len(states), 2)


def _gumbel_choose(x: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    inv_t = 1.0 / temperature[:, None]  # float32, correctly rounded; the kernel does the same
    score = x.float() * inv_t - torch.log(-torch.log(u))
    score = score.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    winner = score.argmax(dim=1, keepdim=True)  # first maximum, as the kernel's tie-break
    out = torch.full_like(x, float("-inf"))
    return out.scatter_(1, winner, x.gather(1, winner))


def row_values(batch: WatermarkBatch, vocab_size: int) -> torch.Tensor:
    """value(v) for every row and token (int64 [B, V] in [0, 2**32)); OFF or skipped rows hold -1."""
    table = batch.table.cpu()
    states = _row_states(table)
    schemes = WatermarkBatch(table, batch.has_gumbel, batch.any_active).effective_scheme()
    out = torch.full((len(batch), vocab_size), -1, dtype=torch.int64)
    for scheme in (Scheme.KGW_LEFTHASH, Scheme.KGW_SELFHASH, Scheme.GUMBEL):
        rows = (schemes == scheme).nonzero().flatten()
        if rows.numel():
            out[rows] = H.u32_value(H.vocab_values(scheme, states[rows], vocab_size))
    return out


def green_mask(batch: WatermarkBatch, vocab_size: int) -> torch.Tensor:
    """Bool [B, V]: True where a KGW row adds delta (NaN logits aside). False on other rows."""
    params = batch.to("cpu")
    values = row_values(params, vocab_size)
    schemes = params.effective_scheme()
    kgw = (schemes == Scheme.KGW_LEFTHASH) | (schemes == Scheme.KGW_SELFHASH)
    return kgw[:, None] & (values >= 0) & (values < H.u32_value(params.threshold())[:, None])


def _position_values(
    scheme: Scheme, key: bytes, contexts: Sequence[Sequence[int]], candidates: torch.Tensor
) -> torch.Tensor:
    words = H.key_words(key)
    states = H.u32_bits([H.row_state(scheme, words, ctx) for ctx in contexts]).reshape(len(contexts), 2)
    return H.element_values(scheme, states, candidates if candidates.dim() == 2 else candidates[:, None])


def kgw_green(
    key: bytes,
    contexts: Sequence[Sequence[int]],
    candidates: torch.Tensor,
    scheme: Scheme,
    gamma: float,
) -> torch.Tensor:
    """Detector view of KGW: is candidates[i] (or each of candidates[i, :]) green after contexts[i]?

    `contexts[i]` is the window actually hashed (the last `width` tokens, fewer at the text's start).
    Returns bool [N] for candidates [N], or [N, K] for [N, K]. CPU, plain torch.
    """
    if scheme not in (Scheme.KGW_LEFTHASH, Scheme.KGW_SELFHASH):
        raise ValueError("kgw_green needs a KGW scheme")
    values = _position_values(scheme, key, contexts, candidates)
    green = H.u32_lt(values, H.u32_bits(H.gamma_threshold(gamma)))
    return green if candidates.dim() == 2 else green[:, 0]


def gumbel_u(key: bytes, contexts: Sequence[Sequence[int]], candidates: torch.Tensor) -> torch.Tensor:
    """Detector view of Gumbel: the float32 uniform u behind candidates[i] after contexts[i] (exact)."""
    u = H.gumbel_uniform(_position_values(Scheme.GUMBEL, key, contexts, candidates))
    return u if candidates.dim() == 2 else u[:, 0]


def _check(logits: torch.Tensor, batch: WatermarkBatch) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(batch):
        raise ValueError(f"logits {tuple(logits.shape)} do not match a batch of {len(batch)} rows")
    if logits.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"unsupported logits dtype {logits.dtype}")
    if logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")
