"""Flat exact cosine top-K by threshold filtering: the sort leaves the inner loop.

tau_m = the K-th best q_m . t over the sample tokens[::S] <= the K-th best over all tokens, so the
answer of ``cosine_topk`` is the top-K of the candidates {n : q_m . t_n >= tau_m - slack}; a query
with more than CAP candidates takes the streaming search. Letters as in ``cosine_topk``; S the
sample stride, CAP candidate slots per query. The passes, the slack and the float16 variant:
docs/kernels.md.
"""

from __future__ import annotations

import math
import os
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from raid_fast.kernels.cosine_topk import (
    MAX_K,
    MAX_TOKENS,
    SENTINEL,
    _merge_keys,
    _pack_keys,
    _sim_tile,
    _unpack_keys,
    admissibility_args,
    block_d,
    cosine_topk_triton,
    dot_precision,
    split_tokens,
    topk_config,
)

# None: the RAID_FAST_FLAT_SEARCH environment variable, else "stream"
FLAT_SEARCH: str | None = None
FLAT_SEARCHES = ("stream", "filter", "filter_fp16")
# the sample stride stays within these: 1 is the whole database (nothing saved); a larger stride
# makes the threshold pass cheaper and the candidate lists longer (about K * S per query)
MIN_SAMPLE_STRIDE = 4
MAX_SAMPLE_STRIDE = 32
# candidate slots per expected candidate: the K-th of a sample lands near rank K * S, with a spread
# of about sqrt(K) * S
CAP_FACTOR = 4
# queries per filter round: bounds the [M, CAP] candidate buffer (CAP = 19,200 int64 -> 300 MB at 2,048)
MAX_ROUND_BYTES = 2**28


def flat_search() -> str:
    """How the triton backend of ``cosine_topk`` searches: ``"stream"`` (default), ``"filter"`` or
    ``"filter_fp16"``.

    ``"stream"``: one pass, a running top-K per query updated tile by tile. ``"filter"``: a pass over
    a sample for a per-query threshold, a pass over everything that only compares and appends, and
    a top-K over the few candidates (this module); ``"filter_fp16"`` the same with the compare pass
    on float16 tensor cores and an exact re-rank. Same results; the faster one depends on the GPU
    and the sizes, so it is a switch (``RAID_FAST_FLAT_SEARCH``) measured by the benchmarks.
    """
    value = FLAT_SEARCH if FLAT_SEARCH is not None else os.environ.get("RAID_FAST_FLAT_SEARCH", "stream")
    if value not in FLAT_SEARCHES:
        msg = f"RAID_FAST_FLAT_SEARCH must be one of {list(FLAT_SEARCHES)}, got {value!r}"
        raise ValueError(msg)
    return value


class FilterPlan(NamedTuple):
    """Sample stride and candidate slots per query of a filtered search."""

    sample_stride: int
    cap: int


def filter_plan(n: int, k: int) -> FilterPlan | None:
    """The plan for N tokens and K neighbours, or None when filtering cannot pay (N too small).

    Balances the two sorting costs: the threshold pass sorts about N / S keys per query, the
    candidate top-K about K * S, so S = sqrt(N / K) (halved: the threshold pass also pays a q . t
    tile per sorted tile), clamped to [MIN_SAMPLE_STRIDE, MAX_SAMPLE_STRIDE].
    """
    stride = min(MAX_SAMPLE_STRIDE, math.isqrt(max(n // max(k, 1), 0)) // 2)
    if stride < MIN_SAMPLE_STRIDE:
        return None
    return FilterPlan(stride, CAP_FACTOR * k * stride)


class FilterConfig(NamedTuple):
    """Launch shape of the filter pass: BM query rows, BN token rows per tile."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def filter_config() -> FilterConfig:
    # no running top-K lives in registers here, so a query block can be as tall as a tensor-core
    # tile: each token tile then serves 64 queries per read (the streaming kernel's BM is 16 or 32).
    # From ptxas on sm_90 (not timings): 64 x 128 tiles spill 80-124 bytes, 4 warps spill more,
    # 64 x 64 on 8 warps spills 0-16
    return FilterConfig(64, 64, 8, 2)


def filter_slack(d: int, precision: str) -> float:
    """Upper bound on |s1 - s2| for two evaluations of the same q . t (|q|, |t| <= 1) at ``precision``,
    plus the rounding of the threshold's 1 - (1 - s) round trip.

    One fp32 dot of length D is within (D + 2) * 2^-24 of the exact value (the products, the sum,
    the norm slack); TF32 operands round to 11 significant bits (2^-11 each, 2^-10 per product
    summed over |q_i t_i| <= 1), as do float16 ones (``"fp16"``, plus its subnormals), tf32x3 drops
    the lo * lo term (2^-22); tensor-core accumulation is allowed (D + 2) * 2^-23. The bound is loose
    on purpose: a wider band only admits a few more candidates.
    """
    single = (d + 2) * 2.0**-24
    if precision == "tf32x3":
        single = 2.0**-21 + (d + 2) * 2.0**-23
    elif precision == "tf32":
        single = 2.0**-10 + 2.0**-21 + (d + 2) * 2.0**-23
    elif precision == "fp16":
        # as tf32 (11 significant bits), plus components below float16's normal range (< 2^-14),
        # rounded to absolute 2^-25 each
        single = 2.0**-10 + 2.0**-21 + (d + 2) * 2.0**-23 + d * 2.0**-24
    return 2.0 * single + 2.0**-22


@triton.jit
def _filter_candidates_kernel(
    q_ptr,
    t_ptr,
    lo_ptr,
    hi_ptr,
    grp_ptr,
    excl_ptr,
    thr_ptr,
    count_ptr,
    cand_ptr,
    M,
    N,
    D,
    cap,
    chunk_n,
    stride_qm,
    stride_qd,
    stride_tn,
    stride_td,
    HAS_RANGE: tl.constexpr,
    HAS_GROUP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
    DOT: tl.constexpr,
):
    # cand[m, count[m]++] = key of every admissible token n of this chunk with q_m . t_n >= thr[m]
    i_m = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM]
    m_m = o_m < M
    n_start = i_c * chunk_n
    n_end = tl.minimum(n_start + chunk_n, N)
    if HAS_RANGE:
        b_lo = tl.load(lo_ptr + o_m, mask=m_m, other=N)  # [BM]
        b_hi = tl.load(hi_ptr + o_m, mask=m_m, other=0)
        n_start = tl.maximum(n_start, tl.min(b_lo, axis=0))
        n_end = tl.minimum(n_end, tl.max(b_hi, axis=0))
    if HAS_GROUP:
        b_excl = tl.load(excl_ptr + o_m, mask=m_m, other=-1)  # [BM]
    # a padded row's threshold is +inf: nothing passes
    b_thr = tl.load(thr_ptr + o_m, mask=m_m, other=float("inf"))  # [BM]

    for n0 in range(n_start, n_end, BN):
        o_n = n0 + tl.arange(0, BN)  # [BN]
        m_n = o_n < n_end
        b_sim = _sim_tile(q_ptr, t_ptr, o_m, m_m, o_n, m_n, D, stride_qm, stride_qd, stride_tn, stride_td, BD, DOT)
        m_pass = m_m[:, None] & m_n[None, :] & (b_sim >= b_thr[:, None])  # [BM, BN]
        if HAS_RANGE:
            m_pass = m_pass & (o_n[None, :] >= b_lo[:, None]) & (o_n[None, :] < b_hi[:, None])
        if HAS_GROUP:
            b_grp = tl.load(grp_ptr + o_n, mask=m_n, other=-1)  # [BN]
            m_pass = m_pass & (b_grp[None, :] != b_excl[:, None])
        b_pass = m_pass.to(tl.int32)
        b_new = tl.sum(b_pass, axis=1)  # [BM]
        # most tiles of a well-placed threshold have no candidate at all
        if tl.sum(b_new, axis=0) > 0:
            # one atomic per query reserves its slots (in arrival order: the top-K below does not
            # depend on it); the passing tokens of a row take consecutive ones
            b_base = tl.atomic_add(count_ptr + o_m, b_new, mask=b_new > 0, sem="relaxed")  # [BM]
            b_slot = b_base[:, None] + tl.cumsum(b_pass, axis=1) - 1  # [BM, BN]
            p_cand = cand_ptr + o_m[:, None] * cap + b_slot
            tl.store(p_cand, _pack_keys(b_sim, o_n[None, :]), mask=m_pass & (b_slot < cap))


@triton.jit
def _candidate_topk_kernel(
    cand_ptr,
    count_ptr,
    dist_ptr,
    idx_ptr,
    M,
    K,
    cap,
    BM: tl.constexpr,
    LOG_K: tl.constexpr,
    LOG_BN: tl.constexpr,
    NATIVE_SORT: tl.constexpr,
):
    # dist, idx [M, K] = the K best of cand[m, :min(count[m], cap)], ascending distance
    K_PAD: tl.constexpr = 1 << LOG_K
    BN: tl.constexpr = 1 << LOG_BN
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM]
    m_m = o_m < M
    b_count = tl.minimum(tl.load(count_ptr + o_m, mask=m_m, other=0), cap)  # [BM]
    b_top = tl.full([BM, K_PAD], SENTINEL, tl.int64)
    for s0 in range(0, tl.max(b_count, axis=0), BN):
        o_s = s0 + tl.arange(0, BN)  # [BN]
        m_s = m_m[:, None] & (o_s[None, :] < b_count[:, None])
        b_keys = tl.load(cand_ptr + o_m[:, None] * cap + o_s[None, :], mask=m_s, other=SENTINEL)  # [BM, BN]
        b_top = _merge_keys(b_top, b_keys, LOG_K, LOG_BN, NATIVE_SORT)
    b_dist, b_idx = _unpack_keys(b_top)  # [BM, K_PAD]
    o_k = tl.arange(0, K_PAD)
    m_out = m_m[:, None] & (o_k < K)[None, :]
    tl.store(dist_ptr + o_m[:, None] * K + o_k[None, :], b_dist, mask=m_out)
    tl.store(idx_ptr + o_m[:, None] * K + o_k[None, :], b_idx, mask=m_out)


@triton.jit
def _rerank_kernel(
    q_ptr,
    t_ptr,
    idx_ptr,
    sim_ptr,
    R,
    D,
    stride_qm,
    stride_qd,
    stride_tn,
    stride_td,
    BR: tl.constexpr,
    BD: tl.constexpr,
):
    # sim[m, r] = q_m . t_idx[m, r] in fp32 products (-inf where idx < 0), for R candidates per query
    i_m = tl.program_id(0).to(tl.int64)
    o_r = tl.program_id(1) * BR + tl.arange(0, BR)  # [BR]
    m_r = o_r < R
    b_idx = tl.load(idx_ptr + i_m * R + o_r, mask=m_r, other=-1)  # [BR]
    m_t = b_idx >= 0
    b_sim = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)  # [BD]
        m_d = o_d < D
        b_q = tl.load(q_ptr + i_m * stride_qm + o_d * stride_qd, mask=m_d, other=0.0)  # [BD]
        p_t = t_ptr + b_idx[:, None] * stride_tn + o_d[None, :] * stride_td
        b_t = tl.load(p_t, mask=m_t[:, None] & m_d[None, :], other=0.0)  # [BR, BD]
        b_sim += tl.sum(b_t * b_q[None, :], axis=1)
    tl.store(sim_ptr + i_m * R + o_r, tl.where(m_t, b_sim, float("-inf")), mask=m_r)


# (weak reference to a tokens tensor, its version counter, its float16 copy): the last one converted
_HALF_TOKENS: tuple | None = None


def half_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """A float16 copy of ``tokens``, made once and reused while the same tensor lives unchanged.

    The version counter moves with every in-place write to the tensor or a view of it, and the weak
    reference dies with the tensor, so a stale copy is never used (it would break the slack bound).
    """
    global _HALF_TOKENS
    if _HALF_TOKENS is not None:
        ref, version, half = _HALF_TOKENS
        if ref() is tokens and version == tokens._version:
            return half
    half = tokens.to(torch.float16).contiguous()
    _HALF_TOKENS = (weakref.ref(tokens), tokens._version, half)
    return half


def _sampled_thresholds(queries, tokens, k, lo, hi, token_group, exclude_group, stride, slack):
    """thr [M] float32: the K-th best similarity over ``tokens[::stride]`` minus ``slack`` (-inf when
    the sample holds fewer than K admissible tokens for the query: every token is a candidate)."""
    sample = tokens[::stride]  # [ceil(N / S), D], a view: sample row i is token i * S
    s_lo = s_hi = s_group = None
    if lo is not None:
        # token i * S lies in [lo, hi) exactly when ceil(lo / S) <= i < ceil(hi / S)
        s_lo = (lo + stride - 1) // stride
        s_hi = (hi + stride - 1) // stride
    if exclude_group is not None:
        s_group = token_group[::stride].contiguous()
    dist, _ = cosine_topk_triton(queries, sample, k, s_lo, s_hi, s_group, exclude_group)  # [M, K]
    return (1.0 - dist[:, k - 1]) - slack  # +inf distance -> -inf threshold


def cosine_topk_filtered(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    token_group: torch.Tensor | None = None,
    exclude_group: torch.Tensor | None = None,
    *,
    half: bool = False,
    plan: FilterPlan | None = None,
    rerank: int | None = None,
    n_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cosine_topk_triton`` by threshold filtering (module docstring); same arguments and results.

    ``half``: the compare pass on float16 copies, then the exact re-rank (``"filter_fp16"``).
    ``plan`` overrides ``filter_plan`` (tests use small strides and caps), ``rerank`` the K2
    candidates re-ranked exactly (a power of two >= 16), ``n_chunks`` the split of the token axis
    in the filter pass. Falls back to the streaming search when no plan pays.
    """
    m, d = queries.shape
    n = tokens.shape[0]
    dev = queries.device
    if n > MAX_TOKENS:
        msg = f"cosine_topk_filtered packs token ids into 32 bits: N must be <= {MAX_TOKENS}, got {n}"
        raise RuntimeError(msg)
    plan = plan if plan is not None else filter_plan(n, k)
    if m == 0 or n == 0 or plan is None:
        return cosine_topk_triton(queries, tokens, k, lo, hi, token_group, exclude_group, n_chunks=n_chunks)
    if plan.sample_stride < 1 or plan.cap < k:
        msg = f"plan needs sample_stride >= 1 and cap >= k={k}, got {plan}"
        raise ValueError(msg)
    cfg = topk_config(k)
    # K2: the approximate top list re-ranked exactly; the kernels' K is at most MAX_K
    k2 = rerank if rerank is not None else min(2 << cfg.log_k, MAX_K)
    if half and (k2 < k or k2 > MAX_K or k2 & (k2 - 1)):
        msg = f"rerank must be a power of two in [k={k}, {MAX_K}], got {k2}"
        raise ValueError(msg)
    lo, hi, token_group, exclude_group = admissibility_args(m, n, dev, lo, hi, token_group, exclude_group)
    has_range, has_group = lo is not None, exclude_group is not None

    precision = dot_precision()
    slack = filter_slack(d, precision)
    half_slack = filter_slack(d, "fp16")
    thr = _sampled_thresholds(
        queries,
        tokens,
        k,
        lo,
        hi,
        token_group,
        exclude_group,
        plan.sample_stride,
        slack + (half_slack if half else 0.0),
    )  # [M]
    scan_q, scan_t = (queries.to(torch.float16), half_tokens(tokens)) if half else (queries, tokens)
    top_k = k2 if half else k
    kcfg = topk_config(top_k)
    fcfg = filter_config()
    bn = fcfg.block_n
    dist = torch.empty((m, top_k), dtype=torch.float32, device=dev)
    idx = torch.empty((m, top_k), dtype=torch.int64, device=dev)
    count = torch.zeros(m, dtype=torch.int32, device=dev)
    rows = max(fcfg.block_m, MAX_ROUND_BYTES // (8 * plan.cap) // fcfg.block_m * fcfg.block_m)
    cand = torch.empty((min(m, rows), plan.cap), dtype=torch.int64, device=dev)  # [rows, CAP] keys
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        mr = r1 - r0
        m_blocks = triton.cdiv(mr, fcfg.block_m)
        chunks, chunk_n = split_tokens(n, bn, m_blocks, dev, n_chunks)
        q = scan_q[r0:r1]
        _filter_candidates_kernel[(m_blocks, chunks)](
            q,
            scan_t,
            lo[r0:r1] if has_range else q,
            hi[r0:r1] if has_range else q,
            token_group if has_group else q,
            exclude_group[r0:r1] if has_group else q,
            thr[r0:r1],
            count[r0:r1],
            cand,
            mr,
            n,
            d,
            plan.cap,
            chunk_n,
            q.stride(0),
            q.stride(1),
            scan_t.stride(0),
            scan_t.stride(1),
            HAS_RANGE=has_range,
            HAS_GROUP=has_group,
            BM=fcfg.block_m,
            BN=bn,
            BD=block_d(d),
            DOT=cfg.dot_precision,
            num_warps=fcfg.num_warps,
            num_stages=fcfg.num_stages,
        )
        _candidate_topk_kernel[(triton.cdiv(mr, kcfg.block_m),)](
            cand,
            count[r0:r1],
            dist[r0:r1],
            idx[r0:r1],
            mr,
            top_k,
            plan.cap,
            BM=kcfg.block_m,
            LOG_K=kcfg.log_k,
            LOG_BN=kcfg.log_bn,
            NATIVE_SORT=kcfg.native_sort,
            num_warps=kcfg.num_warps,
            num_stages=kcfg.num_stages,
        )

    redo = count > plan.cap  # [M]
    if half:
        dist, idx, certified = _rerank(queries, tokens, k, dist, idx, count, half_slack)
        redo |= ~certified
    over = torch.nonzero(redo).squeeze(1)  # [R]: the one host sync
    if over.numel() > 0:
        sub = (
            queries[over],
            tokens,
            k,
            lo[over] if has_range else None,
            hi[over] if has_range else None,
            token_group if has_group else None,
            exclude_group[over] if has_group else None,
        )
        dist[over], idx[over] = cosine_topk_triton(*sub, n_chunks=n_chunks)
    return dist, idx


def _rerank(queries, tokens, k, approx_dist, approx_idx, count, half_slack):
    """Exact top-K of the K2 approximate best candidates, and whether that is the exact answer.

    approx_dist, approx_idx [M, K2] come from float16 similarities. Certified [M] bool: a query had
    at most K2 candidates (all re-ranked), or its K-th exact similarity beats the K2-th approximate
    one by more than ``half_slack``, which bounds |approximate - exact| (whatever was not re-ranked
    is then strictly worse than the K-th).
    """
    m, k2 = approx_idx.shape
    d = queries.shape[1]
    sims = torch.empty((m, k2), dtype=torch.float32, device=queries.device)  # [M, K2]
    block_r = 64
    _rerank_kernel[(m, triton.cdiv(k2, block_r))](
        queries,
        tokens,
        approx_idx,
        sims,
        k2,
        d,
        queries.stride(0),
        queries.stride(1),
        tokens.stride(0),
        tokens.stride(1),
        BR=block_r,
        BD=min(64, max(16, triton.next_power_of_2(d))),
        num_warps=4,
    )
    dist, idx = _best_by_key(sims, approx_idx, k)  # [M, K]
    kth_exact = torch.topk(sims, k, dim=1).values[:, k - 1]  # [M] the K-th exact similarity
    last_approx = 1.0 - approx_dist[:, k2 - 1]  # -inf when slot K2 is empty
    certified = (count <= k2) | (kth_exact > last_approx + half_slack)
    return dist, idx, certified


def _best_by_key(sims: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dist [M, K], idx [M, K]): the K best of sims, idx [M, R] (idx < 0: an empty slot) in the order
    of the kernels' packed keys (``_pack_keys``): ascending 1 - sim, equal distances by ascending id."""
    bits = (sims - 1.0).view(torch.int32)
    keys = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) << 32) | (0xFFFFFFFF - idx)
    keys = torch.where(idx >= 0, keys, SENTINEL.value)
    top = torch.topk(keys, k, dim=1).values  # [M, K] descending, distinct keys
    high = (top >> 32).to(torch.int32)
    neg = (high ^ ((high >> 31) & 0x7FFFFFFF)).view(torch.float32)  # sim - 1
    found = top != SENTINEL.value
    return torch.where(found, 0.0 - neg, float("inf")), torch.where(found, 0xFFFFFFFF - (top & 0xFFFFFFFF), -1)


def cosine_topk_flat(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    token_group: torch.Tensor | None = None,
    exclude_group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The triton backend of ``cosine_topk``: the search ``flat_search()`` names."""
    search = flat_search()
    if search != "stream":
        half = search == "filter_fp16" and k <= MAX_K // 2
        return cosine_topk_filtered(queries, tokens, k, lo, hi, token_group, exclude_group, half=half)
    return cosine_topk_triton(queries, tokens, k, lo, hi, token_group, exclude_group)


__all__ = [
    "FilterPlan",
    "cosine_topk_filtered",
    "cosine_topk_flat",
    "filter_plan",
    "filter_slack",
    "flat_search",
    "half_tokens",
]
