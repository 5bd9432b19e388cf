"""Inverted-list (IVF) top-K in Triton, grouped by list: each probed list is read once per batch.

(dist, idx)[m] = the K smallest (1 - q_m . t_n, n) over the tokens n of the lists probes[m, :],
lexicographically, as ``raid_fast.ref.ivf_search.ivf_topk_ref``. Letters: M queries, P probe slots
per query, L lists (CSR ``list_offsets`` [L + 1]), N tokens, D dims, K neighbours, BM queries per
program, W work items. The counting-sort schedule, the scan and the merge: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from raid_fast.kernels.cosine_topk import (
    MAX_TOKENS,
    SENTINEL,
    _merge_tile,
    _sim_tile,
    block_d,
    merge_partials,
    missing,
    topk_config,
)


@triton.jit
def _ivf_topk_scan_kernel(
    q_ptr,
    t_ptr,
    grp_ptr,
    excl_ptr,
    off_ptr,
    order_ptr,
    start_ptr,
    first_ptr,
    part_ptr,
    L,
    P,
    D,
    K,
    stride_qm,
    stride_qd,
    stride_tn,
    stride_td,
    HAS_GROUP: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    LOG_K: tl.constexpr,
    LOG_BN: tl.constexpr,
    NATIVE_SORT: tl.constexpr,
    DOT: tl.constexpr,
):
    # part[m * P + slot, :K] = the K best keys of query m over list probes[m, slot], descending
    K_PAD: tl.constexpr = 1 << LOG_K
    BN: tl.constexpr = 1 << LOG_BN
    i_w = tl.program_id(0).to(tl.int64)
    # the list of work item i_w: the last l with first[l] <= i_w (lists without work items share
    # their first with the next list, so the last one is the list that owns i_w); spare items
    # (i_w >= first[L]) scan nothing
    m_used = i_w < tl.load(first_ptr + L)
    lo = tl.zeros([], dtype=tl.int64)
    hi = tl.zeros([], dtype=tl.int64) + L
    while hi - lo > 1:
        mid = (lo + hi) // 2
        right = tl.load(first_ptr + mid) <= i_w
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    i_l = lo
    i_blk = i_w - tl.load(first_ptr + i_l)
    r_start = tl.load(start_ptr + i_l) + i_blk * BM
    r_end = tl.load(start_ptr + i_l + 1)
    n_start = tl.load(off_ptr + i_l)
    # a spare work item scans nothing and stores nothing
    n_end = tl.where(m_used, tl.load(off_ptr + i_l + 1), n_start)
    o_r = r_start + tl.arange(0, BM)  # [BM]
    m_r = (o_r < r_end) & m_used
    b_pair = tl.load(order_ptr + o_r, mask=m_r, other=0)  # [BM] = m * P + slot
    o_m = b_pair // P
    if HAS_GROUP:
        b_excl = tl.load(excl_ptr + o_m, mask=m_r, other=-1)  # [BM]

    b_top = tl.full([BM, K_PAD], SENTINEL, tl.int64)
    for n0 in range(n_start, n_end, BN):
        o_n = n0 + tl.arange(0, BN)  # [BN]
        m_n = o_n < n_end
        b_sim = _sim_tile(q_ptr, t_ptr, o_m, m_r, o_n, m_n, D, stride_qm, stride_qd, stride_tn, stride_td, BD, DOT)
        m_ok = m_r[:, None] & m_n[None, :]  # [BM, BN]
        if HAS_GROUP:
            b_grp = tl.load(grp_ptr + o_n, mask=m_n, other=-1)  # [BN]
            m_ok = m_ok & (b_grp[None, :] != b_excl[:, None])
        b_top = _merge_tile(b_top, b_sim, o_n, m_ok, LOG_K, LOG_BN, NATIVE_SORT)

    o_k = tl.arange(0, K_PAD)
    p_part = part_ptr + b_pair[:, None] * K + o_k[None, :]
    tl.store(p_part, b_top, mask=m_r[:, None] & (o_k < K)[None, :])


@triton.jit
def _probe_count_kernel(probes_ptr, count_ptr, MP, BLOCK: tl.constexpr):
    # count[l] += number of (query, slot) pairs probing list l; unused slots (-1) are not counted
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b_l = tl.load(probes_ptr + o, mask=o < MP, other=-1)
    tl.atomic_add(count_ptr + b_l, 1, mask=b_l >= 0)


@triton.jit
def _probe_schedule_kernel(count_ptr, start_ptr, first_ptr, cursor_ptr, L, BM: tl.constexpr, BL: tl.constexpr):
    # one program: start = exclusive prefix of the counts (pairs before list l), first = exclusive
    # prefix of the work items cdiv(count, BM); start[L] = pairs used, first[L] = work items
    carry_s = tl.zeros([], dtype=tl.int64)
    carry_f = tl.zeros([], dtype=tl.int64)
    for l0 in range(0, L, BL):
        o = l0 + tl.arange(0, BL)
        m = o < L
        b_cnt = tl.load(count_ptr + o, mask=m, other=0).to(tl.int64)
        b_blk = (b_cnt + BM - 1) // BM
        b_start = carry_s + tl.cumsum(b_cnt, axis=0) - b_cnt
        tl.store(start_ptr + o, b_start, mask=m)
        tl.store(cursor_ptr + o, b_start, mask=m)
        tl.store(first_ptr + o, carry_f + tl.cumsum(b_blk, axis=0) - b_blk, mask=m)
        carry_s += tl.sum(b_cnt, axis=0)
        carry_f += tl.sum(b_blk, axis=0)
    tl.store(start_ptr + L, carry_s)
    tl.store(first_ptr + L, carry_f)


@triton.jit
def _probe_scatter_kernel(probes_ptr, cursor_ptr, order_ptr, MP, BLOCK: tl.constexpr):
    # order[start[l] .. start[l + 1]) = the pairs of list l, in whatever order the atomics give: a
    # pair's result depends only on its query and list, so the grouping cannot change any output
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < MP
    b_l = tl.load(probes_ptr + o, mask=m, other=-1)
    m_used = m & (b_l >= 0)
    pos = tl.atomic_add(cursor_ptr + b_l, 1, mask=m_used)
    tl.store(order_ptr + pos, o.to(tl.int64), mask=m_used)


def _invert_probes(probes: torch.Tensor, n_lists: int, bm: int) -> tuple[torch.Tensor, ...]:
    """(order [M*P], start [L+1], first [L+1], w_max) of the cluster-grouped schedule.

    order: the used (query, slot) pairs m * P + slot grouped by list; start[l]: the first pair of
    list l; first[l]: its first work item (first[L]: all work items). Four launches (a memset, a
    count, a one-program prefix sum, a scatter), no host sync: w_max comes from shapes only.
    """
    dev = probes.device
    flat = probes.reshape(-1).contiguous()  # [M * P]
    mp = flat.numel()
    count = torch.zeros(n_lists, dtype=torch.int32, device=dev)
    start = torch.empty(n_lists + 1, dtype=torch.int64, device=dev)
    first = torch.empty(n_lists + 1, dtype=torch.int64, device=dev)
    cursor = torch.empty(n_lists, dtype=torch.int64, device=dev)
    order = torch.empty(mp, dtype=torch.int64, device=dev)
    block = 1024
    _probe_count_kernel[(triton.cdiv(mp, block),)](flat, count, mp, BLOCK=block)
    _probe_schedule_kernel[(1,)](count, start, first, cursor, n_lists, BM=bm, BL=1024)
    _probe_scatter_kernel[(triton.cdiv(mp, block),)](flat, cursor, order, mp, BLOCK=block)
    w_max = triton.cdiv(mp, bm) + min(n_lists, mp)
    return order, start, first, w_max


def _ivf_partials(
    queries: torch.Tensor,
    probes: torch.Tensor,
    list_offsets: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    token_group: torch.Tensor | None,
    exclude_group: torch.Tensor | None,
) -> torch.Tensor | None:
    """part [M, P, K] descending keys per (query, probe slot), or None when nothing can be found."""
    m, d = queries.shape
    p = probes.shape[1]
    n_lists = list_offsets.shape[0] - 1
    n = tokens.shape[0]
    if n > MAX_TOKENS:
        msg = f"ivf_topk_triton packs token ids into 32 bits: N must be <= {MAX_TOKENS}, got {n}"
        raise RuntimeError(msg)
    if m == 0 or p == 0 or n_lists <= 0 or n == 0:
        return None
    has_group = exclude_group is not None
    if has_group:
        token_group = token_group.contiguous()
        exclude_group = exclude_group.contiguous()
    list_offsets = list_offsets.contiguous()
    cfg = topk_config(k)
    order, start, first, w_max = _invert_probes(probes, n_lists, cfg.block_m)
    part = torch.empty((m, p, k), dtype=torch.int64, device=queries.device)  # [M, P, K] packed keys
    _ivf_topk_scan_kernel[(w_max,)](
        queries,
        tokens,
        token_group if has_group else queries,
        exclude_group if has_group else queries,
        list_offsets,
        order,
        start,
        first,
        part,
        n_lists,
        p,
        d,
        k,
        queries.stride(0),
        queries.stride(1),
        tokens.stride(0),
        tokens.stride(1),
        HAS_GROUP=has_group,
        BM=cfg.block_m,
        BD=block_d(d),
        LOG_K=cfg.log_k,
        LOG_BN=cfg.log_bn,
        NATIVE_SORT=cfg.native_sort,
        DOT=cfg.dot_precision,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return part


def ivf_topk_triton(
    queries: torch.Tensor,
    probes: torch.Tensor,
    list_offsets: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    token_group: torch.Tensor | None = None,
    exclude_group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K by 1 - cos over the union of each query's probed lists; same contract as ``ivf_topk_ref``.

    queries [M, D] f32, probes [M, P] list ids (-1 unused), list_offsets [L + 1], tokens [N, D] f32.
    Returns dist [M, K] float32 ascending (+inf missing), idx [M, K] int64 global ids (-1 missing).
    """
    part = _ivf_partials(queries, probes, list_offsets, tokens, k, token_group, exclude_group)
    if part is None:
        return missing(queries.shape[0], k, queries.device)
    dist, idx, _ = merge_partials(part, k, probes=probes)
    return dist, idx


def ivf_topk_cost_volume_triton(
    queries: torch.Tensor,
    probes: torch.Tensor,
    list_offsets: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    token_group: torch.Tensor | None,
    exclude_group: torch.Tensor | None,
    b: int,
    h: int,
    w: int,
    pad_cost: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ivf_topk_triton`` whose merge also writes the cost volume, for M = b * h * w queries.

    Returns dist [M, K], idx [M, K] and volume [B, K, H, W] float32 (query b * h * w + y * w + x
    at volume[b, :, y, x]; missing neighbours cost ``pad_cost``), as ``cost_volume_ref`` would give.
    """
    m = queries.shape[0]
    if m != b * h * w:
        msg = f"ivf_topk_cost_volume_triton needs M = b * h * w queries, got M={m}, b={b}, h={h}, w={w}"
        raise ValueError(msg)
    part = _ivf_partials(queries, probes, list_offsets, tokens, k, token_group, exclude_group)
    if part is None:
        dist, idx = missing(m, k, queries.device)
        volume = torch.full((b, k, h, w), float(pad_cost), dtype=torch.float32, device=queries.device)
        return dist, idx, volume
    dist, idx, volume = merge_partials(part, k, probes=probes, volume_shape=(b, h * w), pad_cost=pad_cost)
    return dist, idx, volume.view(b, k, h, w)
