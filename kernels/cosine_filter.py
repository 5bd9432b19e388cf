"""Flat exact cosine top-K by threshold filtering: the sort leaves the inner loop.

The streaming kernel of ``cosine_topk`` sorts a [BM, BN] tile whenever one of its BM queries
improves, which at database scale is nearly every tile: a top-K_PAD of BN packed int64 keys costs
more than the tile's q . t product once that product runs on tensor cores. This path sorts only
candidates that can still be in the answer, found with one compare per similarity.

Letters as in ``cosine_topk``; S the sample stride, CAP candidate slots per query.

1. Threshold: the streaming search over the sample ``tokens[::S]`` (same ranges and groups).
   Its K-th best similarity tau[m] is a lower bound on the K-th best over all tokens, since the
   sample is a subset; about K * S tokens of the whole database reach it.
2. ``_filter_candidates_kernel``, grid (cdiv(M, BM), C): every q . t tile of the whole database
   (the same ``_sim_tile`` as the streaming kernel); each admissible similarity >= tau[m] - slack
   is appended as a packed key to query m's row of a [M, CAP] buffer (a relaxed atomic add per
   query and tile reserves the slots, a prefix sum over the tile's row places them). ``slack`` bounds how far two evaluations of the same q . t at the same
   dot precision can differ (``filter_slack``), so every token of the final top-K passes, ties at
   the K-th distance included.
3. ``_candidate_topk_kernel``, grid (cdiv(M, BM),): top-K of each query's candidates, written as
   dist/idx in their final layout.
4. A query with more than CAP candidates (an unlucky sample, or a range with fewer than K sampled
   tokens and more than CAP in all) is searched again with the streaming kernel. Knowing which
   costs one host sync per call, paid only on this path.

The result is the streaming kernel's (the same similarities; equal up to the order inside a tie).
Assumes what the op promises: queries and tokens of norm <= ~1, which bounds the slack.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from raid_fast.kernels.cosine_topk import (
    MAX_TOKENS,
    SENTINEL,
    _merge_keys,
    _num_chunks,
    _pack_keys,
    _sim_tile,
    _unpack_keys,
    block_d,
    cosine_topk_triton,
    dot_precision,
    topk_config,
)

# None: the RAID_FAST_FLAT_SEARCH environment variable, else "stream"
FLAT_SEARCH: Optional[str] = None
FLAT_SEARCHES = ("stream", "filter")
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
    """How the triton backend of ``cosine_topk`` searches: ``"stream"`` (default) or ``"filter"``.

    ``"stream"``: one pass, a running top-K per query updated tile by tile. ``"filter"``: a pass over
    a sample for a per-query threshold, a pass over everything that only compares and appends, and
    a top-K over the few candidates (this module). Same results; the faster one depends on the GPU
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


def filter_plan(n: int, k: int) -> Optional[FilterPlan]:
    """The plan for N tokens and K neighbours, or None when filtering cannot pay (N too small).

    Balances the two sorting costs: the threshold pass sorts about N / S keys per query, the
    candidate top-K about K * S, so S = sqrt(N / K) (halved: the threshold pass also pays a q . t
    tile per sorted tile), clamped to [MIN_SAMPLE_STRIDE, MAX_SAMPLE_STRIDE].
    """
    stride = min(MAX_SAMPLE_STRIDE, math.isqrt(max(n // max(k, 1), 0)) // 2)
    if stride < MIN_SAMPLE_STRIDE:
        return None
    return FilterPlan(stride, CAP_FACTOR * k * stride)


def filter_slack(d: int, precision: str) -> float:
    """Upper bound on |s1 - s2| for two evaluations of the same q . t (|q|, |t| <= 1) at ``precision``,
    plus the rounding of the threshold's 1 - (1 - s) round trip.

    One fp32 dot of length D is within (D + 2) * 2^-24 of the exact value (the products, the sum,
    the norm slack); TF32 operands round to 11 significant bits (2^-11 each, 2^-10 per product
    summed over |q_i t_i| <= 1), tf32x3 drops the lo * lo term (2^-22); tensor-core accumulation is
    allowed (D + 2) * 2^-23. The bound is loose on purpose: a wider band only admits a few more
    candidates.
    """
    single = (d + 2) * 2.0**-24
    if precision == "tf32x3":
        single = 2.0**-21 + (d + 2) * 2.0**-23
    elif precision == "tf32":
        single = 2.0**-10 + 2.0**-21 + (d + 2) * 2.0**-23
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
    lo: Optional[torch.Tensor] = None,
    hi: Optional[torch.Tensor] = None,
    token_group: Optional[torch.Tensor] = None,
    exclude_group: Optional[torch.Tensor] = None,
    *,
    plan: Optional[FilterPlan] = None,
    n_chunks: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cosine_topk_triton`` by threshold filtering (module docstring); same arguments and results.

    ``plan`` overrides ``filter_plan`` (tests use small strides and caps); ``n_chunks`` the split of
    the token axis in the filter pass. Falls back to the streaming search when no plan pays.
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
    has_range = lo is not None or hi is not None
    if has_range:
        lo = torch.zeros(m, dtype=torch.int64, device=dev) if lo is None else lo.to(torch.int64).contiguous()
        hi = torch.full((m,), n, dtype=torch.int64, device=dev) if hi is None else hi.to(torch.int64).contiguous()
    has_group = exclude_group is not None
    if has_group:
        token_group = token_group.contiguous()
        exclude_group = exclude_group.contiguous()

    precision = dot_precision()
    thr = _sampled_thresholds(
        queries, tokens, k, lo, hi, token_group, exclude_group, plan.sample_stride, filter_slack(d, precision)
    )  # [M]
    cfg = topk_config(k)
    bn = 1 << cfg.log_bn
    dist = torch.empty((m, k), dtype=torch.float32, device=dev)
    idx = torch.empty((m, k), dtype=torch.int64, device=dev)
    count = torch.zeros(m, dtype=torch.int32, device=dev)
    rows = max(cfg.block_m, MAX_ROUND_BYTES // (8 * plan.cap) // cfg.block_m * cfg.block_m)
    cand = torch.empty((min(m, rows), plan.cap), dtype=torch.int64, device=dev)  # [rows, CAP] keys
    n_tiles = triton.cdiv(n, bn)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        mr = r1 - r0
        m_blocks = triton.cdiv(mr, cfg.block_m)
        chunks = n_chunks if n_chunks is not None else _num_chunks(m_blocks, n_tiles, dev)
        chunks = max(1, min(chunks, n_tiles, 65535))
        chunk_n = triton.cdiv(n_tiles, chunks) * bn
        chunks = triton.cdiv(n, chunk_n)
        q = queries[r0:r1]
        _filter_candidates_kernel[(m_blocks, chunks)](
            q,
            tokens,
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
            tokens.stride(0),
            tokens.stride(1),
            HAS_RANGE=has_range,
            HAS_GROUP=has_group,
            BM=cfg.block_m,
            BN=bn,
            BD=block_d(d),
            DOT=cfg.dot_precision,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        _candidate_topk_kernel[(m_blocks,)](
            cand,
            count[r0:r1],
            dist[r0:r1],
            idx[r0:r1],
            mr,
            k,
            plan.cap,
            BM=cfg.block_m,
            LOG_K=cfg.log_k,
            LOG_BN=cfg.log_bn,
            NATIVE_SORT=cfg.native_sort,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )

    over = torch.nonzero(count > plan.cap).squeeze(1)  # [R]: the one host sync
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


def cosine_topk_flat(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    lo: Optional[torch.Tensor] = None,
    hi: Optional[torch.Tensor] = None,
    token_group: Optional[torch.Tensor] = None,
    exclude_group: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The triton backend of ``cosine_topk``: the search ``flat_search()`` names."""
    if flat_search() == "filter":
        return cosine_topk_filtered(queries, tokens, k, lo, hi, token_group, exclude_group)
    return cosine_topk_triton(queries, tokens, k, lo, hi, token_group, exclude_group)


__all__ = ["FilterPlan", "cosine_topk_filtered", "cosine_topk_flat", "filter_plan", "filter_slack", "flat_search"]
