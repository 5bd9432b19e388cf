"""Flat exact cosine top-K in Triton: fused q . t tiles with a running top-K per query, then a merge.

(dist, idx)[m] = the K smallest (1 - q_m . t_n, n) over admissible tokens n, lexicographically (equal
distances by ascending n), as ``raid_fast.ref.similarity.cosine_topk_ref``. Letters: M queries, N
tokens, D dims, K neighbours, K_PAD = K rounded up to a power of two (>= 16), C chunks of the token
axis. Packed keys, sort networks and launch shapes: docs/kernels.md.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# the packing keeps the token index in the low 32 bits
MAX_TOKENS = 2**31 - 1
MAX_K = 512
# d is streamed in slices, so this only bounds compile variants and run time, not registers
MAX_DIM = 8192
# an empty slot: below every packed key of a finite similarity
SENTINEL = tl.constexpr(-(2**63))


@triton.jit
def _pack_keys(b_sim, o_n):
    # high half: an order-preserving int32 of the bits of sim - 1 = -(1 - sim) exactly (negative
    # floats count down), so keys tie exactly where the distances do; low half: 2^32 - 1 - index,
    # so that of equal distances the smaller index has the larger key and sorts first
    b_bits = (b_sim - 1.0).to(tl.int32, bitcast=True)
    b_key = b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)
    return (b_key.to(tl.int64) << 32) | (0xFFFFFFFF - o_n.to(tl.int64))


@triton.jit
def _unpack_keys(b_keys):
    b_key = (b_keys >> 32).to(tl.int32)
    b_neg = (b_key ^ ((b_key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    m_hit = b_keys != SENTINEL
    # 0 - x rather than -x: a distance of exactly 0 stays +0
    b_dist = tl.where(m_hit, 0.0 - b_neg, float("inf"))
    b_idx = tl.where(m_hit, 0xFFFFFFFF - (b_keys & 0xFFFFFFFF), -1)
    return b_dist, b_idx


@triton.jit
def _compare_swap(x, S: tl.constexpr, DIR_BIT: tl.constexpr, DESC: tl.constexpr):
    # one layer of a bitonic network on the last axis of x [BM, N]: each pair (i, i + S) of a
    # 2S-block is put in ascending order, descending where bit DIR_BIT of i is set (DIR_BIT < 0:
    # nowhere), and the other way round if DESC. min/max over a size-2 axis rather than tl.sort's
    # xor_sum, which the interpreter evaluates element by element in python
    BM: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    A: tl.constexpr = N // (2 * S)
    h = tl.reshape(x, [BM, A, 2, S])
    b_min = tl.min(h, axis=2, keep_dims=True)  # [BM, A, 1, S]
    b_max = tl.max(h, axis=2, keep_dims=True)
    o_r = tl.arange(0, 2)[None, None, :, None]  # [1, 1, 2, 1]
    if DIR_BIT >= 0:
        o_a = ((tl.arange(0, A) * (2 * S)) >> DIR_BIT) & 1  # [A]
        m_max = o_r ^ o_a[None, :, None, None] ^ DESC
    else:
        m_max = o_r ^ DESC
    return tl.reshape(tl.where(m_max == 1, b_max, b_min), [BM, N])


@triton.jit
def _topk_asc(x, LOG_K: tl.constexpr, LOG_N: tl.constexpr, NATIVE_SORT: tl.constexpr):
    # the 2**LOG_K largest of each row of x [BM, 2**LOG_N], sorted ascending
    if NATIVE_SORT:
        x = tl.flip(tl.topk(x, 1 << LOG_K), 1)
    else:
        # bitonic top-k (the algorithm of tl.topk): sort runs of 2**LOG_K in alternating order,
        # then halve repeatedly, the elementwise max of two neighbour runs being their top half
        for st in tl.static_range(1, LOG_K + 1):
            for j in tl.static_range(st):
                x = _compare_swap(x, 1 << (st - 1 - j), st if st < LOG_N else -1, 0)
        for i in tl.static_range(LOG_K + 1, LOG_N + 1):
            h = tl.reshape(x, [x.shape[0], x.shape[1] // (2 << LOG_K), 2, 1 << LOG_K])
            x = tl.reshape(tl.max(h, axis=2), [x.shape[0], x.shape[1] // 2])
            for j in tl.static_range(LOG_K):
                x = _compare_swap(x, 1 << (LOG_K - 1 - j), LOG_K if i < LOG_N else -1, 0)
    return x


@triton.jit
def _merge_sorted(b_top, b_new, LOG_K: tl.constexpr, NATIVE_SORT: tl.constexpr):
    # b_top [BM, K_PAD] descending, b_new [BM, K_PAD] ascending: their elementwise max is the top
    # K_PAD of the union as a bitonic sequence, and one bitonic merge sorts it descending again
    x = tl.maximum(b_top, b_new)
    if NATIVE_SORT:
        x = tl.bitonic_merge(x, 1, True)
    else:
        for j in tl.static_range(LOG_K):
            x = _compare_swap(x, 1 << (LOG_K - 1 - j), -1, 1)
    return x


@triton.jit
def _merge_keys(b_top, b_keys, LOG_K: tl.constexpr, LOG_BN: tl.constexpr, NATIVE_SORT: tl.constexpr):
    # b_top [BM, K_PAD] sorted descending; b_keys [BM, BN] packed keys in any order, BN >= K_PAD
    m_better = tl.max(b_keys, axis=1) > tl.min(b_top, axis=1)  # [BM]
    # a tile that beats no query's current k-th key changes nothing: skip its sort
    if tl.sum(m_better.to(tl.int32), axis=0) > 0:
        b_top = _merge_sorted(b_top, _topk_asc(b_keys, LOG_K, LOG_BN, NATIVE_SORT), LOG_K, NATIVE_SORT)
    return b_top


@triton.jit
def _merge_tile(b_top, b_sim, o_n, m_ok, LOG_K: tl.constexpr, LOG_BN: tl.constexpr, NATIVE_SORT: tl.constexpr):
    # b_sim [BM, BN] similarities to tokens o_n [BN]. inadmissible candidates (m_ok [BM, BN] false)
    # become SENTINEL, below every real key, so they can only fill slots no admissible token reaches
    b_keys = tl.where(m_ok, _pack_keys(b_sim, o_n[None, :]), SENTINEL)
    return _merge_keys(b_top, b_keys, LOG_K, LOG_BN, NATIVE_SORT)


@triton.jit
def _sim_tile(
    q_ptr, t_ptr, o_q, m_q, o_n, m_n, D, stride_qm, stride_qd, stride_tn, stride_td, BD: tl.constexpr, DOT: tl.constexpr
):
    # q . t of query rows o_q [BM] and token rows o_n [BN] in fp32, d streamed in BD slices; DOT is
    # tl.dot's input_precision ("ieee": exact fp32 products on CUDA cores; see dot_precision())
    o_d = tl.arange(0, BD)
    b_sim = tl.zeros([o_q.shape[0], o_n.shape[0]], dtype=tl.float32)  # [BM, BN]
    for d0 in range(0, D, BD):
        m_d = (d0 + o_d) < D
        p_q = q_ptr + o_q[:, None] * stride_qm + (d0 + o_d)[None, :] * stride_qd
        p_t = t_ptr + o_n[None, :] * stride_tn + (d0 + o_d)[:, None] * stride_td
        b_q = tl.load(p_q, mask=m_q[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
        b_t = tl.load(p_t, mask=m_d[:, None] & m_n[None, :], other=0.0)  # [BD, BN]
        b_sim += tl.dot(b_q, b_t, input_precision=DOT)
    return b_sim


@triton.jit
def _cosine_topk_partial_kernel(
    q_ptr,
    t_ptr,
    lo_ptr,
    hi_ptr,
    grp_ptr,
    excl_ptr,
    part_ptr,
    M,
    N,
    D,
    K,
    chunk_n,
    n_chunks,
    stride_qm,
    stride_qd,
    stride_tn,
    stride_td,
    HAS_RANGE: tl.constexpr,
    HAS_GROUP: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    LOG_K: tl.constexpr,
    LOG_BN: tl.constexpr,
    NATIVE_SORT: tl.constexpr,
    DOT: tl.constexpr,
):
    # part[m, c, :K] = the K best packed keys of query m over tokens of chunk c, descending
    K_PAD: tl.constexpr = 1 << LOG_K
    BN: tl.constexpr = 1 << LOG_BN
    i_m = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM]
    m_m = o_m < M
    n_start = i_c * chunk_n
    n_end = tl.minimum(n_start + chunk_n, N)
    if HAS_RANGE:
        b_lo = tl.load(lo_ptr + o_m, mask=m_m, other=N)  # [BM]
        b_hi = tl.load(hi_ptr + o_m, mask=m_m, other=0)
        # tiles outside every query's range of this block are never computed
        n_start = tl.maximum(n_start, tl.min(b_lo, axis=0))
        n_end = tl.minimum(n_end, tl.max(b_hi, axis=0))
    if HAS_GROUP:
        b_excl = tl.load(excl_ptr + o_m, mask=m_m, other=-1)  # [BM]

    b_top = tl.full([BM, K_PAD], SENTINEL, tl.int64)
    for n0 in range(n_start, n_end, BN):
        o_n = n0 + tl.arange(0, BN)  # [BN]
        m_n = o_n < n_end
        b_sim = _sim_tile(q_ptr, t_ptr, o_m, m_m, o_n, m_n, D, stride_qm, stride_qd, stride_tn, stride_td, BD, DOT)
        m_ok = m_m[:, None] & m_n[None, :]  # [BM, BN]
        if HAS_RANGE:
            m_ok = m_ok & (o_n[None, :] >= b_lo[:, None]) & (o_n[None, :] < b_hi[:, None])
        if HAS_GROUP:
            b_grp = tl.load(grp_ptr + o_n, mask=m_n, other=-1)  # [BN]
            m_ok = m_ok & (b_grp[None, :] != b_excl[:, None])
        b_top = _merge_tile(b_top, b_sim, o_n, m_ok, LOG_K, LOG_BN, NATIVE_SORT)

    # only the first K of the sorted list can reach the final top-K
    o_k = tl.arange(0, K_PAD)
    p_part = part_ptr + (o_m * n_chunks + i_c)[:, None] * K + o_k[None, :]
    tl.store(p_part, b_top, mask=m_m[:, None] & (o_k < K)[None, :])


@triton.jit
def _topk_merge_kernel(
    part_ptr,
    probe_ptr,
    dist_ptr,
    idx_ptr,
    vol_ptr,
    M,
    C,
    K,
    n_pos,
    pad_cost,
    stride_pm,
    stride_pc,
    HAS_PROBES: tl.constexpr,
    WRITE_VOLUME: tl.constexpr,
    BM: tl.constexpr,
    LOG_K: tl.constexpr,
    NATIVE_SORT: tl.constexpr,
):
    # part [M, C, K] descending keys -> dist, idx [M, K]; with probes, slot c is read only where
    # probes[m, c] >= 0; with WRITE_VOLUME also volume [B, K, n_pos] for query m = b * n_pos + l
    K_PAD: tl.constexpr = 1 << LOG_K
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM]
    m_m = o_m < M
    o_k = tl.arange(0, K_PAD)
    m_k = o_k < K
    # reading each stored list back to front gives it ascending, sentinels first, as the merge wants
    o_rev = K_PAD - 1 - o_k
    b_top = tl.full([BM, K_PAD], SENTINEL, tl.int64)
    for c in range(0, C):
        m_row = m_m
        if HAS_PROBES:
            b_probe = tl.load(probe_ptr + o_m * stride_pm + c * stride_pc, mask=m_m, other=-1)  # [BM]
            m_row = m_row & (b_probe >= 0)
        p_part = part_ptr + (o_m * C + c)[:, None] * K + o_rev[None, :]
        b_part = tl.load(p_part, mask=m_row[:, None] & (o_rev < K)[None, :], other=SENTINEL)  # [BM, K_PAD]
        b_top = _merge_sorted(b_top, b_part, LOG_K, NATIVE_SORT)
    b_dist, b_idx = _unpack_keys(b_top)  # [BM, K_PAD]
    m_out = m_m[:, None] & m_k[None, :]
    tl.store(dist_ptr + o_m[:, None] * K + o_k[None, :], b_dist, mask=m_out)
    tl.store(idx_ptr + o_m[:, None] * K + o_k[None, :], b_idx, mask=m_out)
    if WRITE_VOLUME:
        o_b = o_m // n_pos
        o_l = o_m % n_pos
        p_vol = vol_ptr + (o_b * K * n_pos + o_l)[:, None] + o_k[None, :] * n_pos
        tl.store(p_vol, tl.where(b_idx < 0, pad_cost, b_dist), mask=m_out)


# None: native tl.topk / tl.bitonic_merge when compiled, the min/max network when interpreted
NATIVE_SORT: bool | None = None
# None: the RAID_FAST_DOT_PRECISION environment variable, else "ieee"
DOT_PRECISION: str | None = None
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")


def dot_precision() -> str:
    """tl.dot input precision of the search kernels' q . t tiles.

    ``"ieee"`` (default): fp32 products on CUDA cores, results equal to the float32 reference up to
    summation order. ``"tf32x3"``: three TF32 tensor-core products per tile (hi*hi + hi*lo + lo*hi),
    close to float32 accuracy. ``"tf32"``: one, with a 10-bit mantissa, so near-ties may reorder and
    distances move by ~1e-3. Exposed for measuring the trade-off on a GPU (the interpreter computes
    every variant in float32).
    """
    value = DOT_PRECISION if DOT_PRECISION is not None else os.environ.get("RAID_FAST_DOT_PRECISION", "ieee")
    if value not in DOT_PRECISIONS:
        msg = f"RAID_FAST_DOT_PRECISION must be one of {list(DOT_PRECISIONS)}, got {value!r}"
        raise ValueError(msg)
    return value


def _native_sort() -> bool:
    # compiled kernels use tl.topk / tl.bitonic_merge; the interpreter runs their xor_sum reductions
    # one element at a time in python, so there the same network is built from min/max instead
    if NATIVE_SORT is not None:
        return NATIVE_SORT
    return os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


class TopkConfig(NamedTuple):
    """Launch shape for a top-K of ``k``: K_PAD = 2**log_k, BM query rows, BN = 2**log_bn token rows."""

    log_k: int
    block_m: int
    log_bn: int
    num_warps: int
    num_stages: int
    native_sort: bool
    dot_precision: str


def topk_config(k: int) -> TopkConfig:
    # tl.topk and tl.arange need powers of two and tl.dot extents >= 16
    kp = max(16, triton.next_power_of_2(k))
    # fewer query rows for a long K, so the [BM, K_PAD] running lists stay in registers
    bm = 32 if kp <= 128 else 16
    bn = max(64, kp)
    # chosen from ptxas resource usage for sm_90 (registers, spills, shared memory), not from timings
    warps = 4 if kp <= 64 else (8 if kp <= 256 else 16)
    stages = 3 if kp <= 64 else 2
    return TopkConfig(kp.bit_length() - 1, bm, bn.bit_length() - 1, warps, stages, _native_sort(), dot_precision())


def block_d(d: int) -> int:
    """Slice of D per tl.dot: every tl.dot extent must be >= 16; 32 keeps the fp32 operands small."""
    return min(32, max(16, triton.next_power_of_2(d)))


# streaming multiprocessors that launch plans assume; None: the device's own. Setting it (to 132, an
# H200's) makes interpreted calls plan their grids as that GPU would, so that their launches can be
# recorded as the specialisations a GPU run compiles (tests/library/triton_aot.py)
PLAN_SMS: int | None = None


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors the launches on ``device`` are planned for; None when interpreted
    on a CPU (grids then stay small: the interpreter runs programs one by one)."""
    if PLAN_SMS is not None:
        return PLAN_SMS
    if device.type != "cuda":
        return None
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _num_chunks(m_blocks: int, n_tiles: int, device: torch.device) -> int:
    # enough programs to fill the gpu a few times over; interpreted, a few chunks (to exercise the
    # merge) are enough
    sms = sm_count(device)
    target = 4 * sms if sms is not None else 4
    return max(1, min(n_tiles, triton.cdiv(target, m_blocks)))


def split_tokens(n: int, bn: int, m_blocks: int, device: torch.device, n_chunks: int | None = None) -> tuple[int, int]:
    """(chunks, chunk_n): the token axis of N in chunks of chunk_n tokens (a multiple of ``bn``),
    one grid column each; ``n_chunks`` overrides the choice of ``_num_chunks`` (tests)."""
    n_tiles = triton.cdiv(n, bn)
    chunks = n_chunks if n_chunks is not None else _num_chunks(m_blocks, n_tiles, device)
    # grid axis 1 is limited to 65535 programs
    chunks = max(1, min(chunks, n_tiles, 65535))
    chunk_n = triton.cdiv(n_tiles, chunks) * bn
    return triton.cdiv(n, chunk_n), chunk_n


def admissibility_args(m: int, n: int, device: torch.device, lo, hi, token_group, exclude_group) -> tuple:
    """(lo, hi, token_group, exclude_group) as the kernels read them: both range ends or neither
    (a missing end is 0 or N), contiguous ids; token_group is dropped when nothing is excluded."""
    if lo is not None or hi is not None:
        lo = torch.zeros(m, dtype=torch.int64, device=device) if lo is None else lo.contiguous()
        hi = torch.full((m,), n, dtype=torch.int64, device=device) if hi is None else hi.contiguous()
    if exclude_group is None:
        return lo, hi, None, None
    return lo, hi, token_group.contiguous(), exclude_group.contiguous()


def missing(m: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """dist [m, k] of +inf and idx [m, k] of -1: the answer when there is nothing to search."""
    dist = torch.full((m, k), float("inf"), dtype=torch.float32, device=device)
    idx = torch.full((m, k), -1, dtype=torch.int64, device=device)
    return dist, idx


def merge_partials(
    part: torch.Tensor,
    k: int,
    probes: torch.Tensor | None = None,
    volume_shape: tuple[int, int] | None = None,
    pad_cost: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merges ``part`` [M, C, K] descending keys into (dist [M, K], idx [M, K], volume or None).

    ``probes`` [M, C] masks slots (< 0: not searched, never read). ``volume_shape = (B, L)`` with
    M = B * L also writes the cost volume [B, K, L] (+inf -> ``pad_cost``).
    """
    m, c, _ = part.shape
    dev = part.device
    cfg = topk_config(k)
    dist = torch.empty((m, k), dtype=torch.float32, device=dev)
    idx = torch.empty((m, k), dtype=torch.int64, device=dev)
    vol = None
    n_pos = 1
    if volume_shape is not None:
        b, n_pos = volume_shape
        vol = torch.empty((b, k, n_pos), dtype=torch.float32, device=dev)
    if m == 0:
        return dist, idx, vol
    stride_pm, stride_pc = probes.stride() if probes is not None else (0, 0)
    _topk_merge_kernel[(triton.cdiv(m, cfg.block_m),)](
        part,
        probes if probes is not None else part,
        dist,
        idx,
        vol if vol is not None else dist,
        m,
        c,
        k,
        n_pos,
        float(pad_cost),
        stride_pm,
        stride_pc,
        HAS_PROBES=probes is not None,
        WRITE_VOLUME=vol is not None,
        BM=cfg.block_m,
        LOG_K=cfg.log_k,
        NATIVE_SORT=cfg.native_sort,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return dist, idx, vol


def cosine_topk_triton(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    token_group: torch.Tensor | None = None,
    exclude_group: torch.Tensor | None = None,
    *,
    n_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-K by 1 - cos of ``queries`` [M, D] over ``tokens`` [N, D] (fp32, any strides).

    Same arguments and results as ``cosine_topk_ref``; ``n_chunks`` overrides the split of the token
    axis (tests). Returns dist [M, K] float32 ascending (+inf missing), idx [M, K] int64 (-1 missing).
    """
    m, d = queries.shape
    n = tokens.shape[0]
    dev = queries.device
    if n > MAX_TOKENS:
        msg = f"cosine_topk_triton packs token ids into 32 bits: N must be <= {MAX_TOKENS}, got {n}"
        raise RuntimeError(msg)
    if m == 0 or n == 0:
        return missing(m, k, dev)
    lo, hi, token_group, exclude_group = admissibility_args(m, n, dev, lo, hi, token_group, exclude_group)
    has_range, has_group = lo is not None, exclude_group is not None

    cfg = topk_config(k)
    m_blocks = triton.cdiv(m, cfg.block_m)
    chunks, chunk_n = split_tokens(n, 1 << cfg.log_bn, m_blocks, dev, n_chunks)

    part = torch.empty((m, chunks, k), dtype=torch.int64, device=dev)  # [M, C, K] packed keys
    _cosine_topk_partial_kernel[(m_blocks, chunks)](
        queries,
        tokens,
        lo if has_range else queries,
        hi if has_range else queries,
        token_group if has_group else queries,
        exclude_group if has_group else queries,
        part,
        m,
        n,
        d,
        k,
        chunk_n,
        chunks,
        queries.stride(0),
        queries.stride(1),
        tokens.stride(0),
        tokens.stride(1),
        HAS_RANGE=has_range,
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
    dist, idx, _ = merge_partials(part, k)
    return dist, idx
