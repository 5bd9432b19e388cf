"""Inverted-list (IVF) top-K in Triton, grouped by list: each probed list is read once per batch.

Letters: M queries, P probe slots per query, L lists (CSR ``list_offsets`` [L + 1]), N tokens,
D dims, K neighbours, BM queries per program, W work items. Semantics:
``raid_fast.ref.ivf_search.ivf_topk_ref``; keys and merges as in ``cosine_topk``.

1. The probe map is inverted on the device with torch (no host sync): the M * P (query, slot)
   pairs are sorted by list, so the pairs of list l are ``order[start[l]:start[l + 1]]``; list l
   gets cdiv(count, BM) work items, and a work item is (list, block of BM of its pairs).
2. ``_ivf_topk_scan_kernel``, grid (W_max,): scans the list's contiguous token slice once for its
   BM queries (fp32 q . t tiles, streaming top-K) and writes each pair's K best keys into a
   [M, P, K] buffer at (query, slot). W_max = cdiv(M * P, BM) + min(L, M * P) bounds the real
   number of work items without reading it back; the spare programs exit at once.
3. ``_topk_merge_kernel``, grid (cdiv(M, BM),): one global top-K per query over its probed slots
   (unused slots, probe -1, are never read), optionally writing the cost volume [B, K, H, W] too.
"""

from __future__ import annotations

from typing import Optional

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
    work_ptr,
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
    i_l = tl.load(work_ptr + i_w)  # L for a spare work item
    m_used = i_l < L
    i_l = tl.minimum(i_l, L - 1)
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


def _invert_probes(probes: torch.Tensor, n_lists: int, bm: int) -> tuple[torch.Tensor, ...]:
    """(order [M*P], start [L+1], first [L], work [W_max]) of the cluster-grouped schedule.

    order: (query, slot) pairs m * P + slot sorted by list (unused slots first); start[l]: the
    first pair of list l; first[l]: its first work item; work[w]: the list of work item w (L if spare).
    All device ops, no host sync: W_max comes from shapes only.
    """
    dev = probes.device
    flat = probes.reshape(-1).to(torch.int64)  # [M * P]
    lists, order = torch.sort(flat)
    start = torch.searchsorted(lists, torch.arange(n_lists + 1, device=dev, dtype=torch.int64))  # [L + 1]
    blocks = (start[1:] - start[:-1] + bm - 1) // bm  # [L] work items per list
    ends = torch.cumsum(blocks, 0)
    w_max = triton.cdiv(flat.numel(), bm) + min(n_lists, flat.numel())
    work = torch.searchsorted(ends, torch.arange(w_max, device=dev, dtype=torch.int64), right=True)  # [W_max]
    return order, start, ends - blocks, work


def _ivf_partials(
    queries: torch.Tensor,
    probes: torch.Tensor,
    list_offsets: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    token_group: Optional[torch.Tensor],
    exclude_group: Optional[torch.Tensor],
) -> Optional[torch.Tensor]:
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
    order, start, first, work = _invert_probes(probes, n_lists, cfg.block_m)
    part = torch.empty((m, p, k), dtype=torch.int64, device=queries.device)  # [M, P, K] packed keys
    _ivf_topk_scan_kernel[(work.shape[0],)](
        queries,
        tokens,
        token_group if has_group else queries,
        exclude_group if has_group else queries,
        list_offsets,
        order,
        start,
        first,
        work,
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
    token_group: Optional[torch.Tensor] = None,
    exclude_group: Optional[torch.Tensor] = None,
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
    token_group: Optional[torch.Tensor],
    exclude_group: Optional[torch.Tensor],
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
