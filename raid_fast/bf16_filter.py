"""The bfloat16 candidate filter of the exact flat search on the CPU (``knn`` and a flat ``Index``).

Letters: M queries, N bank vectors, D dims, K neighbours, C candidates per query.

On a CPU with bfloat16 dot-product instructions (AVX512-BF16, AMX) oneDNN's bfloat16 matmul runs
at 2-3x the float32 one. The filter scores every (query, bank vector) pair from bfloat16 copies,
keeps each query's pairs whose score is within a proven error bound of its K-th best, and
``neighbors.rescore`` scores those candidates in float32 with faiss's arithmetic and picks the K
best. Nothing that can be among the K best, by the true distance or by the float32 one, is left
out, so the answer is the one of the float32 search over the whole bank.

The bound, per query (``error_bound``): with ``q~ = bf16(q)``, ``e_q = q - q~`` and the same for a
bank vector x, the matmul's float32 accumulator ``acc`` is within ``|q~| |e_x| + |e_q| |x| + gamma
|sum|`` of ``q . x`` (``|sum|`` the sum of the absolute terms; ``gamma = n 2^-24 / (1 - n 2^-24)``
bounds a float32 sum of n terms in any order); the bfloat16 output ``out`` is within ``2^-8 |acc|``
of ``acc``, which ``_threshold`` applies to the output values themselves (the scores near a query's
best are far smaller than the norms). The bank's norms enter as their maxima, so one bound serves a
query's whole row; the float32 roundings of the centring, of the l2 bias and of the re-scoring are
added. The bank is centred on its mean first (``"l2"``: queries too; ``"ip"``/``"cosine"``: the bank
only, which shifts every score of a query by the same ``q . c``), which shrinks the norms the bound
grows with. For ``"l2"`` the score is ``q' . x' - ||x'||^2 / 2`` (largest where ``||q' - x'||^2`` is
smallest): the bias rides in the matmul as two more bfloat16 columns, its leading and trailing
parts, so the filter never converts the [M, N] scores to float32.

A query with more than ``max_candidates(k)`` candidates (a bank of near-duplicates) or a non-finite
bound takes the float32 search; so does a bank whose norms overflow.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from raid_fast import _checks, _dispatch

# None: the RAID_FAST_CPU_FILTER environment variable, else "auto"
MODE: str | None = None
MODES = ("auto", "on", "off")
# "auto" filters searches of at least this many dims and multiply-adds (M x N x D): below, the
# passes over the [M, N] scores cost more than the bfloat16 matmul saves (2 cores, AVX512-BF16:
# D = 256 breaks even, D = 384 gains 6 %, D = 1,536 gains 50 %; 64 x 4,000 x 1,536 loses 7 %)
MIN_DIM = 384
MIN_WORK = 1 << 29
# the filter pays while the candidates stay few; larger K goes to the float32 search in "auto"
MAX_AUTO_K = 64
# bank rows per slice of the preparation
PREPARE_ROWS = 1024
# [rows, N] scores per round: bounds the bfloat16 scores and the mask
ROUND_ELEMENTS = 1 << 24

_U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8-bit significand, round to nearest even)
_U_FP32 = 2.0**-24


def mode() -> str:
    """``"auto"`` (the filter where the CPU has bfloat16 dot products and the search is large),
    ``"on"`` (every CPU search with ``backend=None``, whatever the CPU: tests) or ``"off"``."""
    value = MODE if MODE is not None else os.environ.get("RAID_FAST_CPU_FILTER", "auto")
    _checks.check_choice("RAID_FAST_CPU_FILTER", value, MODES)
    return value


def has_bf16_dot() -> bool:
    """Whether the CPU runs bfloat16 matmuls in hardware (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def max_candidates(k: int) -> int:
    """Candidates per query above which the query takes the float32 search instead."""
    return max(256, 4 * k)


def applies(m: int, n: int, d: int, k: int, device: torch.device, backend: str | None) -> bool:
    """Whether a flat search of M queries over N vectors goes through the filter."""
    if backend is not None or device.type != "cpu" or m == 0 or n == 0 or torch.compiler.is_compiling():
        return False
    if os.environ.get(_dispatch.ENV_BACKEND):  # a backend asked for by name serves the whole search
        return False
    chosen = mode()
    if chosen != "auto":
        return chosen == "on"
    return k <= MAX_AUTO_K and d >= MIN_DIM and m * n * d >= MIN_WORK and has_bf16_dot()


def _gamma(n: int) -> float:
    """Relative error bound of a float32 sum of n terms, any order (Higham's gamma_n)."""
    return n * _U_FP32 / (1.0 - n * _U_FP32)


def _norm_max(x: torch.Tensor) -> float:
    """An upper bound of max_i ||x_i|| over the rows of x [N, D] (float32 norms, widened by their
    rounding and by squares that underflow)."""
    if x.shape[0] == 0:
        return 0.0
    d = x.shape[1]
    top = float(torch.linalg.vector_norm(x.float(), dim=1).max())
    return top * (1.0 + 2.0 * _gamma(d + 2)) + 2.0**-60 * d


def _bf16_floor(t: torch.Tensor) -> torch.Tensor:
    """The largest bfloat16 values <= t [M] float64 (non-finite stays non-finite)."""
    t32 = (t - t.abs() * 2.0**-23).float()  # <= t after float32's rounding to nearest
    b = t32.to(torch.bfloat16)
    above = b.float() > t32
    # one bfloat16 step down: the magnitude's bits shrink for positives, grow for negatives; from
    # zero to the negative subnormal closest to it (bits 0x8001)
    bits = b.view(torch.int16)
    down = torch.where(b > 0, bits - 1, torch.where(b < 0, bits + 1, torch.full_like(bits, -32767)))
    return torch.where(above, down, bits).view(torch.bfloat16)


class FilterBank(NamedTuple):
    """A bank prepared for the filter."""

    metric: str
    centre: torch.Tensor  # [D] float32, the bank's mean (of the unit vectors for "cosine")
    vectors: torch.Tensor  # [N, D] bfloat16 centred vectors; "l2": [N, D + 2], then -||x'||^2 / 2 in two parts
    centred_norm: float  # max ||x'|| (bounds, as every norm here)
    rounded_norm: float  # max ||bf16(x')||
    rounding_norm: float  # max ||x' - bf16(x')||
    bias: float  # max ||x'||^2 / 2 ("l2"; 0 otherwise)
    norm: float  # max ||x|| of the vectors the re-scoring uses


def prepare_bank(x: torch.Tensor, metric: str) -> FilterBank | None:
    """The bank [N, D] float32 (finite) ready for the filter; None when its norms overflow."""
    if metric == "cosine":
        x = F.normalize(x, dim=-1)  # the vectors neighbors.rescore scores
    n, d = x.shape
    centre = x.mean(0)  # [D]
    extra = 2 if metric == "l2" else 0
    vectors = torch.empty(n, d + extra, dtype=torch.bfloat16)
    centred_norm = rounded_norm = rounding_norm = bias = 0.0
    # in slices that stay in cache: every pass below reads what the one before wrote
    for start in range(0, n, PREPARE_ROWS):
        centred = x[start : start + PREPARE_ROWS] - centre  # [n', D]
        rounded = vectors[start : start + PREPARE_ROWS]
        rounded[:, :d] = centred
        centred_norm = max(centred_norm, _norm_max(centred))
        rounded_norm = max(rounded_norm, _norm_max(rounded[:, :d]))
        rounding_norm = max(rounding_norm, _norm_max(centred - rounded[:, :d].float()))
        if metric == "l2":
            half_sq = 0.5 * (centred * centred).sum(1)  # [n']
            rounded[:, d] = half_sq.neg()
            trail = half_sq + rounded[:, d].float()  # exact in float32: half_sq minus its leading part
            rounded[:, d + 1] = trail.neg()
            bias = max(bias, float(half_sq.max()) * (1.0 + _gamma(d)))
    norm = centred_norm + float(centre.double().norm()) * (1.0 + 2.0 * _gamma(d))  # >= max ||x||
    if not all(math.isfinite(v) and v < 1e30 for v in (centred_norm, rounded_norm, rounding_norm, bias, norm)):
        return None
    return FilterBank(metric, centre, vectors, centred_norm, rounded_norm, rounding_norm, bias, norm)


def error_bound(fb: FilterBank, q: torch.Tensor, centred: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """[M] float64: how far the matmul's float32 accumulator may be from the true score and from
    the float32 re-scored one (both in score units: ``q . x`` for ip/cosine, ``q' . x' - ||x'||^2 / 2``
    for l2), for any bank vector of a query. The accumulator's rounding to the bfloat16 output is
    relative to the value, so ``candidates`` applies it to the values themselves.

    ``q`` [M, D] the queries as re-scored, ``centred`` [M, D] the float32 queries the filter rounded
    (centred for l2), ``rounded`` [M, D] their bfloat16 copies.
    """
    d = q.shape[1]
    g = _gamma(d + 3)
    u = _U_FP32
    q_norm = q.double().norm(dim=1)  # [M] (float64: exact to 2^-50, far below the bound)
    c_norm = centred.double().norm(dim=1)
    r_norm = rounded.double().norm(dim=1)
    e_norm = (centred - rounded.float()).double().norm(dim=1)
    # the bfloat16 roundings of both sides' vectors, the bias split, the float32 accumulation of
    # every term of the sum
    terms = r_norm * fb.rounded_norm + fb.bias * (1.0 + 2.0**-8)
    score = r_norm * fb.rounding_norm + e_norm * fb.centred_norm + (g + 2.0**-16 * 1.01) * fb.bias + g * terms
    if fb.metric == "l2":
        # distances are |q'|^2 - 2 score: the float32 centring (2^-24 of each centred norm) and
        # the re-scoring's float32 expansion, halved into score units
        centring = 2.0 * u * (c_norm + fb.centred_norm) ** 2
        rescore = g * (q_norm + fb.norm) ** 2
    else:
        centring = 2.0 * u * q_norm * fb.centred_norm
        rescore = g * q_norm * fb.norm + 2.0 * u * (1.0 + q_norm * fb.norm)  # cosine adds 1 after
    # bfloat16 dot-product instructions flush subnormal inputs and sums to zero: absolute, tiny
    flushed = 2.0**-100 * d * (1.0 + r_norm) * (1.0 + fb.rounded_norm + fb.bias)
    return (score + centring + rescore + flushed) * (1.0 + 2.0**-20)


def _threshold(kth: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """[M] float64: the least bfloat16 score ``out`` a bank vector may have and still be among a
    query's K best, from the K-th largest output ``kth`` [M] and the accumulator ``bound`` [M].

    An output o is its accumulator rounded to nearest, so the accumulator lies within ``r |o|``
    of it (r = 2^-8 / (1 - 2^-8)) and the true score within ``r |o| + bound``. The K outputs
    >= kth have true scores >= ``kth - r |kth| - bound`` (o - r |o| grows with o), so vector i can
    be among the K best only if ``o_i + r |o_i| + bound >= kth - r |kth| - bound``; o + r |o| grows
    with o too, so that is ``o_i >= t`` for the t below.
    """
    r = _U_BF16 / (1.0 - _U_BF16)
    need = kth - r * kth.abs() - 2.0 * bound
    return torch.where(need >= 0, need / (1.0 + r), need / (1.0 - r))


def candidates(
    q: torch.Tensor, fb: FilterBank, k: int, fallback: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """[M, C] bank ids (C >= K, -1 pads) holding every possible K nearest of each query [M, D];
    ``fallback(rows)`` gives the [len(rows), K] float32-search ids of the queries the filter cannot
    narrow."""
    m = q.shape[0]
    n = fb.vectors.shape[0]
    cap = max_candidates(k)
    kk = min(k, n)
    if fb.metric == "cosine":
        q = F.normalize(q, dim=-1)
    round_rows = max(1, ROUND_ELEMENTS // n)
    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (query rows, slots, ids)
    heavy: list[torch.Tensor] = []
    for start in range(0, m, round_rows):
        qs = q[start : start + round_rows]  # [m, D]
        centred = qs - fb.centre if fb.metric == "l2" else qs
        rounded = centred.to(torch.bfloat16)
        if fb.metric == "l2":
            ones = torch.ones(rounded.shape[0], 2, dtype=rounded.dtype)
            out = torch.cat([rounded, ones], dim=1) @ fb.vectors.T  # [m, N] bfloat16, larger is nearer
        else:
            out = rounded @ fb.vectors.T
        bound = error_bound(fb, qs, centred, rounded)  # [m]
        kth = out.amax(1) if kk == 1 else out.topk(kk, dim=1).values[:, -1]  # [m]
        thr = _bf16_floor(_threshold(kth.double(), bound))  # rounded down: nothing within the bound lost
        mask = out >= thr[:, None]  # [m, N], both bfloat16 (a mixed compare converts all of out)
        rows, ids = mask.nonzero(as_tuple=True)  # row-major: ascending ids per query
        counts = torch.bincount(rows, minlength=qs.shape[0])  # [m]
        bad = (counts > cap) | (counts < kk) | ~torch.isfinite(thr)
        if bool(bad.any()):
            heavy.append(start + bad.nonzero().flatten())
            keep = ~bad[rows]
            rows, ids = rows[keep], ids[keep]
            counts = counts.masked_fill(bad, 0)
        first = torch.cumsum(counts, 0) - counts  # [m]
        slots = torch.arange(rows.numel()) - first[rows]
        pieces.append((rows + start, slots, ids))
    width = max([k] + [int(s.max()) + 1 for _, s, _ in pieces if s.numel()])
    cand = torch.full((m, width), -1, dtype=torch.int64)
    for rows, slots, ids in pieces:
        cand[rows, slots] = ids
    if heavy:
        rows = torch.cat(heavy)
        cand[rows, :k] = fallback(rows)
    return cand
