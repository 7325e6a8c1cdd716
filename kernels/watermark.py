"""Watermark logits operation: public API and the plain-torch reference (what CPU hosts run).

    apply_watermark(logits, batch)  in place; Triton on CUDA tensors, else the torch path: fused by Inductor
                                    (`kernels.watermark_cpu`) once compiled, the eager reference until then
    sample_gumbel(logits, batch)    the token each active Gumbel row chooses (-1 elsewhere); logits untouched

Per row (hash and scheme definitions in `kernels.watermark_hash`):
  KGW (lefthash, selfhash)  logits[v] += delta where value(v) < threshold; every other logit keeps
                            its bits. bf16 logits are added in fp32 and rounded once (to nearest
                            even). NaN logits are never modified.
  KGW, confidence-gated     (gate > 0, for greedy requests) with x = fp32(logits), NaN read as -inf,
                            m = max(x), p1 = exp(m - logsumexp(x)): if p1 < gate, the KGW rule above
                            applied only where x[v] >= fl(m - delta), the only logits a greedy choice
                            can move to; if p1 >= gate (the model is confident) the row is untouched.
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

The gate's p1 goes through exp and logsumexp, which are not correctly rounded: the gate decision can
differ between devices only where p1 lies within a few ulp of the gate.

Integration (vLLM 0.32, `server.watermark.vllm_adapter`): greedy rows are watermarked by
`apply_watermark` in the logits-processor hook (confidence-gated KGW); sampled rows by `sample_gumbel`
inside vLLM's sampler, after penalties, temperature, min-p, top-k and top-p, on the distribution the
request asked for (temperature already applied there, so those rows carry temperature 1). The CPU (V1)
runner and the CUDA runner call the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import watermark_cpu
from kernels import watermark_hash as H
from kernels.watermark_gate import gate_floor
from kernels.watermark_params import (
    COL_CONTEXT,
    COL_CTX_LEN,
    COL_GATE,
    COL_KEY,
    COL_SCHEME,
    COL_SKIP,
    Scheme,
    WatermarkBatch,
)

__all__ = [
    "apply_watermark",
    "apply_watermark_reference",
    "green_mask",
    "gumbel_u",
    "kgw_green",
    "row_values",
    "sample_gumbel",
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
    params = WatermarkBatch(table.to(logits.device), batch.has_gumbel, batch.any_active, batch.has_gated)
    states: torch.Tensor | None = None  # per-row hash state, made when an ungated row needs it
    groups: dict[tuple[int, bool], list[int]] = {}  # (scheme, gated) -> rows, grouped on the host
    for i, (scheme_code, skip, gate_bits) in enumerate(table[:, [COL_SCHEME, COL_SKIP, COL_GATE]].tolist()):
        if scheme_code != Scheme.OFF and not skip:
            groups.setdefault((scheme_code, gate_bits != 0 and scheme_code != Scheme.GUMBEL), []).append(i)
    for scheme in (Scheme.KGW_LEFTHASH, Scheme.KGW_SELFHASH, Scheme.GUMBEL):
        for gate_rows in (False, True) if scheme is not Scheme.GUMBEL else (False,):
            members = groups.get((scheme, gate_rows))
            if not members:
                continue
            if gate_rows:  # writes a few logits in place, no copy of the rows
                _kgw_gated(logits, scheme, members, table, fused)
                continue
            rows = torch.tensor(members, dtype=torch.int64, device=logits.device)
            if states is None:
                states = _row_states(table).to(logits.device)
            every_row = rows.numel() == logits.shape[0]
            x = logits if every_row else logits[rows]  # a view (written in place) or a copy
            if scheme is Scheme.GUMBEL:
                x.copy_(_gumbel_choose(x, _gumbel_uniform(states[rows], logits.shape[1], fused), params, rows))
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


def _kgw_gated(logits: torch.Tensor, scheme: Scheme, rows: list[int], table: torch.Tensor, fused: bool) -> None:
    """Confidence-gated KGW on the rows `rows` of `logits` in place (`table`: the batch's CPU table), at the cost
    of about one pass over the logits; only logits within delta of a row's maximum can be written, so only they
    are hashed.

    One max pass per block of `_CHUNK` logits gives each row's maximum m and the few blocks holding candidates
    (x >= fl(m - delta)); a row with a single candidate has no near-tie and cannot change, so it is left as it
    is. A tied row's gate, s = sum exp(x - m) against 1 / gate (`kernels.watermark_gate`), is open outright
    when gate >= 1 (s > 1 for any tied row), and otherwise often decided by the block maxima alone:
    sum_c exp(max_c - m) <= s <= that sum times `_CHUNK`; the exact sum (fused on CPU hosts) is taken only
    for rows the bounds leave open. Colours come from the keyed hash (`kernels.watermark_hash`) of the
    candidates of open rows only, and hash states only for those rows.
    """
    heads = _chunk_maxima(logits)
    index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
    params = WatermarkBatch(table[rows], False, True, True)
    delta, gate = params.delta().to(logits.device), params.gate().to(logits.device)
    h = heads[index]
    m = h.amax(dim=1)  # NaN when the row holds one: no candidates, the gate stays closed
    floor = torch.where(torch.isfinite(m), m - delta, torch.full_like(m, float("nan")))
    r, v = _window_candidates(logits, index, h, floor)
    if r.numel() == 0:
        return
    tied = (torch.bincount(r, minlength=len(rows)) > 1).nonzero().flatten()
    if tied.numel() == 0:
        return
    gates = gate[tied]
    if bool(((gates >= 1.0) & (delta[tied] <= _SURE_DELTA)).all()):
        is_open = torch.ones_like(tied, dtype=torch.bool)  # s >= 1 + exp(-delta) > 1 >= 1 / gate
    else:
        low = torch.exp(h[tied] - m[tied, None]).sum(dim=1)
        is_open = low * gates > 1.0
        unsure = (~is_open & (low * _CHUNK * gates > 1.0)).nonzero().flatten()
        if unsure.numel():
            ids = tied[unsure]
            x = logits[index[ids]]  # a copy of the few rows whose bounds did not decide
            exact = watermark_cpu.exp_sum(x, m[ids]) if fused and watermark_cpu.applies_to(x) else None
            is_open[unsure] = gate_floor(x, delta[ids], gate[ids], m[ids], exact)[1]
    opened = tied[is_open]
    if opened.numel() == 0:
        return
    row_open = torch.zeros(len(rows), dtype=torch.bool, device=r.device)
    row_open[opened] = True
    keep = row_open[r]
    r, v = r[keep], v[keep]
    open_rows = opened.cpu()
    states = torch.zeros((len(rows), 2), dtype=torch.int32)
    states[open_rows] = _row_states(params.table[open_rows])  # hash states of the open rows only
    values = H.element_values(scheme, states.to(r.device)[r], v[:, None])[:, 0]
    green = H.u32_lt(values, params.threshold().to(r.device)[r])
    wr, wv = index[r[green]], v[green]
    if wr.numel():
        logits[wr, wv] = (logits[wr, wv].float() + delta[r[green]]).to(logits.dtype)


_CHUNK = 64
# A tied row (a second logit within delta of the maximum) has s >= 1 + exp(-delta), which float32 keeps
# above 1 for delta up to ~15.9: with gate >= 1 such a row is open whatever the rest of the row holds.
_SURE_DELTA = 15.0


def _chunk_maxima(x: torch.Tensor) -> torch.Tensor:
    """float32 [N, ceil(V / _CHUNK)]: the maximum of each block of `_CHUNK` logits (NaN propagates)."""
    n, vocab = x.shape
    whole = vocab - vocab % _CHUNK
    heads = x[:, :whole].view(n, whole // _CHUNK, _CHUNK).amax(dim=2).float()
    if whole < vocab:
        heads = torch.cat([heads, x[:, whole:].amax(dim=1, keepdim=True).float()], dim=1)
    return heads


def _window_candidates(
    x: torch.Tensor, index: torch.Tensor, heads: torch.Tensor, floor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, token) of every logit of row index[i] with fp32(x) >= floor[i], found from the blocks whose maximum
    reaches the floor (a NaN floor: none)."""
    vocab = x.shape[1]
    cr, cc = (heads >= floor[:, None]).nonzero(as_tuple=True)
    if cr.numel() == 0:
        return cr, cc
    offsets = cc * _CHUNK
    span = torch.arange(_CHUNK, device=x.device)
    tokens = (offsets[:, None] + span).clamp_(max=vocab - 1)
    inside = (offsets[:, None] + span) < vocab
    hit = (x[index[cr][:, None], tokens].float() >= floor[cr, None]) & inside
    hr, hc = hit.nonzero(as_tuple=True)
    return cr[hr], tokens[hr, hc]


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


def _gumbel_uniform(states: torch.Tensor, vocab: int, fused: bool) -> torch.Tensor:
    u = watermark_cpu.gumbel_uniform(states, vocab) if fused else None
    return u if u is not None else H.gumbel_uniform(H.vocab_values(Scheme.GUMBEL, states, vocab))


def _gumbel_winner(x: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """argmax_v (x[v] * fl(1/T) - log(-log(u[v]))) per row, int64 [N, 1]; NaN scores never win, first on ties."""
    inv_t = 1.0 / temperature[:, None]  # float32, correctly rounded; the kernel does the same
    score = x.float() * inv_t - torch.log(-torch.log(u))
    score = score.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return score.argmax(dim=1, keepdim=True)  # first maximum, as the kernel's tie-break


def _gumbel_choose(x: torch.Tensor, u: torch.Tensor, params: WatermarkBatch, rows: torch.Tensor) -> torch.Tensor:
    winner = _gumbel_winner(x, u, params.temperature()[rows])
    out = torch.full_like(x, float("-inf"))
    return out.scatter_(1, winner, x.gather(1, winner))


def sample_gumbel(logits: torch.Tensor, batch: WatermarkBatch) -> torch.Tensor:
    """The token every active Gumbel row of `batch` chooses, int64 [B] on the logits' device (-1 on every
    other row); `logits` is not modified. The same choice as `apply_watermark` (whose Gumbel rows keep only
    that token's logit): what vLLM's sampler calls on the final, filtered distribution of sampled requests."""
    _check(logits, batch)
    out = torch.full((logits.shape[0],), -1, dtype=torch.int64, device=logits.device)
    if not batch.has_gumbel:
        return out
    table = batch.table.cpu()
    params = WatermarkBatch(table, batch.has_gumbel, batch.any_active, batch.has_gated)
    rows = (params.effective_scheme() == Scheme.GUMBEL).nonzero().flatten()
    if rows.numel() == 0:
        return out
    every_row = rows.numel() == logits.shape[0]
    x = logits if every_row else logits[rows.to(logits.device)]  # the rows themselves, or a copy
    sub = WatermarkBatch(table[rows], True, True)
    if logits.is_cuda:
        x = x.clone() if every_row else x
        apply_watermark(x, sub)  # Triton: one finite logit left per row, the winner
        out[rows.to(logits.device)] = x.float().nan_to_num(nan=float("-inf")).argmax(dim=1)
        return out
    states = _row_states(sub.table)
    inv_t = 1.0 / sub.temperature()
    chosen = _filtered_gumbel(x, states, inv_t)
    if chosen is None and watermark_cpu.applies_to(x):
        chosen = watermark_cpu.gumbel_argmax(x, states, inv_t)
    if chosen is None:
        chosen = _gumbel_winner(x, _gumbel_uniform(states, logits.shape[1], False), sub.temperature())[:, 0]
    out[rows] = chosen
    return out


_SPARSE_SHARE = 4  # the support path serves when at most 1/_SPARSE_SHARE of the blocks hold a live logit


def _filtered_gumbel(x: torch.Tensor, states: torch.Tensor, inv_t: torch.Tensor) -> torch.Tensor | None:
    """The Gumbel choice of the rows `x` computed on their support only, int64 [N]; None where the whole
    vocabulary must be scored (a wide support, a NaN, a row without a live logit).

    After top-k or top-p most logits are -inf (on the default model at top_p 0.9 the median row keeps ~20
    tokens), and -inf never wins, so only the live logits (finite or +inf) need u(v): found through the
    block maxima (`_chunk_maxima`, one pass) and scored with the eager reference's own formula (the same
    floats, ties to the lowest index). A NaN is refused because it hides its block's other logits from the
    maxima; the dense paths read it as -inf."""
    heads = _chunk_maxima(x)
    if bool(torch.isnan(heads).any()):
        return None
    live = heads > float("-inf")
    if int(live.sum()) * _SPARSE_SHARE > live.numel() or not bool(live.any(dim=1).all()):
        return None
    index = torch.arange(x.shape[0], device=x.device)
    floor = torch.full((x.shape[0],), torch.finfo(torch.float32).min, device=x.device)
    r, v = _window_candidates(x, index, heads, floor)  # every logit >= the lowest finite float
    u = H.gumbel_uniform(H.element_values(Scheme.GUMBEL, states[r], v[:, None])[:, 0])
    score = x[r, v].float() * inv_t[r] - torch.log(-torch.log(u))
    best = torch.full((x.shape[0],), float("-inf"), device=x.device).scatter_reduce_(0, r, score, "amax")
    first = score == best[r]
    return torch.full_like(index, x.shape[1]).scatter_reduce_(0, r[first], v[first], "amin")


def row_values(batch: WatermarkBatch, vocab_size: int) -> torch.Tensor:
    """value(v) for every row and token (int64 [B, V] in [0, 2**32)); OFF or skipped rows hold -1."""
    table = batch.table.cpu()
    states = _row_states(table)
    schemes = WatermarkBatch(table, batch.has_gumbel, batch.any_active, batch.has_gated).effective_scheme()
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
