"""Lloyd k-means in Triton on half-precision points: one pass over the points per iteration.

idx_i = argmin_j ||x_i - c_j||^2 (smallest j on ties) and c_j = mean{x_i : idx_i = j}, with x and c
rounded to float16 / bfloat16 and every sum in float32: ``raid_fast.ref.kmeans`` on the rounded
values, which ``raid_fast.kmeans(precision="fp16" | "bf16")`` asks for. Letters: G groups (ragged,
``offsets`` [G + 1]), N points in all, D dims, k centroids per group (k_g = min(k, N_g) used),
KP = k padded to a power of two. Checked without a GPU (ptxas for sm_90,
tests/library/test_triton_compile.py): the pass kernel, in the tensor-core variant a GPU runs, has no
register spills at the D % 16 == 0 shapes compiled there (D = 48, and k = 50 at the benchmarks'
D = 384). The kernels: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from raid_fast.kernels.cosine_topk import sm_count

from raid_fast.ref.kmeans import SPLIT_EPS

MAX_K = 128
# offsets inside a group are int32, also those of a last tile's masked rows (at most MAX_TILE more)
MAX_GROUP_ELEMENTS = 2**31 - 1
MAX_TILE = 128
# one program's sums [KP, window] stay in registers: KP x window <= 64 x 384 floats, in at most
# four named [KP, BD] accumulators
_ACC_BUDGET = 64 * 384
_MAX_ACC = 4
LOW_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _lloyd_pass_kernel(
    x_ptr,
    offsets_ptr,
    c_ptr,
    dist_ptr,
    idx_ptr,
    psum_ptr,
    pcnt_ptr,
    D,
    K,
    SPLIT,
    ACCUMULATE: tl.constexpr,
    DOT_F32: tl.constexpr,
    BM: tl.constexpr,
    KP: tl.constexpr,
    BD: tl.constexpr,
    N_ACC: tl.constexpr,
):
    # x [N, D] half, c [G, K, D] half (rounded centroids); dist [N] fp32, idx [N] int64;
    # psum [G, SPLIT, K, D] fp32, pcnt [G, SPLIT, K] int32.
    # Offsets inside a group are int32 (the host checks N_g * D < 2^31): int64 pointer tensors of a
    # [BM, BD] tile would cost two registers per element.
    i_g = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1)
    i_w = tl.program_id(2)
    begin = tl.load(offsets_ptr + i_g)
    n = (tl.load(offsets_ptr + i_g + 1) - begin).to(tl.int32)
    kg = tl.minimum(n, K)
    x_base = x_ptr + begin * D
    c_base = c_ptr + i_g * K * D
    o_k = tl.arange(0, KP)
    m_k = o_k < kg

    # ||c||^2 from the rounded centroids; padded centroids can never win
    cn = tl.zeros([KP], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_c = tl.load(c_base + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None] & (o_d < D)[None, :], other=0.0)
        b_c = b_c.to(tl.float32)
        cn += tl.sum(b_c * b_c, axis=1)
    cn = tl.where(m_k, cn, float("inf"))

    acc0 = tl.zeros([KP, BD], dtype=tl.float32)
    acc1 = tl.zeros([KP, BD], dtype=tl.float32)
    acc2 = tl.zeros([KP, BD], dtype=tl.float32)
    acc3 = tl.zeros([KP, BD], dtype=tl.float32)
    cnt = tl.zeros([KP], dtype=tl.int32)
    w0 = i_w * (N_ACC * BD)
    n_tiles = tl.cdiv(n, BM)
    for t in range(i_s, n_tiles, SPLIT):
        o_m = t * BM + tl.arange(0, BM)
        m_m = o_m < n
        xc = tl.zeros([BM, KP], dtype=tl.float32)
        xn = tl.zeros([BM], dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m_d = o_d < D
            b_x = tl.load(x_base + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
            b_c = tl.load(c_base + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None] & m_d[None, :], other=0.0)
            if DOT_F32:
                # the interpreter converts and multiplies bfloat16 wrongly; half products are exact in fp32
                xc += tl.dot(b_x.to(tl.float32), tl.trans(b_c.to(tl.float32)))
            else:
                xc += tl.dot(b_x, tl.trans(b_c))  # [BM, KP]
            b_xf = b_x.to(tl.float32)
            xn += tl.sum(b_xf * b_xf, axis=1)
        score = cn[None, :] - 2.0 * xc  # [BM, KP]: ||x - c||^2 - ||x||^2
        best = tl.min(score, axis=1)
        arg = tl.argmin(score, axis=1, tie_break_left=True)
        m_out = m_m & (i_w == 0)
        tl.store(dist_ptr + begin + o_m, tl.maximum(xn + best, 0.0), mask=m_out)
        tl.store(idx_ptr + begin + o_m, arg.to(tl.int64), mask=m_out)
        if ACCUMULATE:
            # built as [KP, BM], the A operand of the sums dot as is: a transposed [BM, KP] one-hot
            # costs a layout conversion and, measured with ptxas for sm_90, register spills
            hit = (o_k[:, None] == arg[None, :]) & m_m[None, :]  # [KP, BM]
            cnt += tl.sum(hit.to(tl.int32), axis=1)
            if DOT_F32:
                b_h = hit.to(tl.float32)
            else:
                b_h = hit.to(x_ptr.dtype.element_ty)
            for a in tl.static_range(N_ACC):
                o_d = w0 + a * BD + tl.arange(0, BD)
                b_x = tl.load(
                    x_base + o_m[:, None] * D + o_d[None, :], mask=m_m[:, None] & (o_d < D)[None, :], other=0.0
                )
                if DOT_F32:
                    part = tl.dot(b_h, b_x.to(tl.float32))
                else:
                    part = tl.dot(b_h, b_x)  # [KP, BD]: sums of this tile's points
                if a == 0:
                    acc0 += part
                elif a == 1:
                    acc1 += part
                elif a == 2:
                    acc2 += part
                else:
                    acc3 += part

    if ACCUMULATE:
        p_row = psum_ptr + (i_g * SPLIT + i_s) * K * D  # this program's partial [K, D]
        m_kw = o_k < K
        for a in tl.static_range(N_ACC):
            o_d = w0 + a * BD + tl.arange(0, BD)
            p_s = p_row + o_k[:, None] * D + o_d[None, :]
            m_s = m_kw[:, None] & (o_d < D)[None, :]
            if a == 0:
                tl.store(p_s, acc0, mask=m_s)
            elif a == 1:
                tl.store(p_s, acc1, mask=m_s)
            elif a == 2:
                tl.store(p_s, acc2, mask=m_s)
            else:
                tl.store(p_s, acc3, mask=m_s)
        tl.store(pcnt_ptr + (i_g * SPLIT + i_s) * K + o_k, cnt, mask=m_kw & (i_w == 0))


@triton.jit
def _lloyd_reduce_kernel(psum_ptr, pcnt_ptr, out_ptr, counts_ptr, D, K, SPLIT, KP: tl.constexpr, BD: tl.constexpr):
    # psum [G, SPLIT, K, D], pcnt [G, SPLIT, K] -> out [G, K, D] fp32 means, counts [G, K] int64
    i_g = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    o_k = tl.arange(0, KP)
    m_k = o_k < K
    o_d = i_d * BD + tl.arange(0, BD)
    m_kd = m_k[:, None] & (o_d < D)[None, :]
    total = tl.zeros([KP, BD], dtype=tl.float32)
    cnt = tl.zeros([KP], dtype=tl.int32)
    for s in range(0, SPLIT):
        row = (i_g * SPLIT + s) * K
        total += tl.load(psum_ptr + (row + o_k)[:, None] * D + o_d[None, :], mask=m_kd, other=0.0)
        cnt += tl.load(pcnt_ptr + row + o_k, mask=m_k, other=0)
    mean = total / tl.maximum(cnt, 1).to(tl.float32)[:, None]
    tl.store(out_ptr + (i_g * K + o_k)[:, None] * D + o_d[None, :], mean, mask=m_kd)
    tl.store(counts_ptr + i_g * K + o_k, cnt.to(tl.int64), mask=m_k & (i_d == 0))


@triton.jit
def _lloyd_fixup_kernel(
    offsets_ptr, out_ptr, counts_ptr, D, K, split_eps, SPHERICAL: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr
):
    # out [G, K, D] fp32 means, rewritten in place; counts [G, K] int64 (read only)
    i_g = tl.program_id(0).to(tl.int64)
    n = tl.load(offsets_ptr + i_g + 1) - tl.load(offsets_ptr + i_g)
    kg = tl.minimum(n, K)
    o_k = tl.arange(0, KP)
    m_k = o_k < kg
    base = out_ptr + i_g * K * D
    work = tl.load(counts_ptr + i_g * K + o_k, mask=o_k < K, other=0)  # [KP] int64

    # empty cluster j (ascending) takes the largest cluster m split in two, as the reference does
    for j in range(0, kg):
        w_j = tl.sum(tl.where(o_k == j, work, 0))
        if w_j == 0:
            m = tl.argmax(tl.where(m_k, work, -1), axis=0, tie_break_left=True)
            w_m = tl.sum(tl.where(o_k == m, work, 0))
            tl.debug_barrier()
            for d0 in range(0, D, BD):
                o_d = d0 + tl.arange(0, BD)
                m_d = o_d < D
                sign = tl.where(o_d % 2 == 0, 1.0, -1.0)
                b_m = tl.load(base + m * D + o_d, mask=m_d, other=0.0)
                tl.store(base + j * D + o_d, b_m * (1.0 + split_eps * sign), mask=m_d)
                tl.store(base + m * D + o_d, b_m * (1.0 - split_eps * sign), mask=m_d)
            tl.debug_barrier()
            half = w_m // 2
            work = tl.where(o_k == j, half, tl.where(o_k == m, w_m - half, work))

    if SPHERICAL:
        tl.debug_barrier()
        ss = tl.zeros([KP], dtype=tl.float32)
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            b_c = tl.load(base + o_k[:, None] * D + o_d[None, :], mask=m_k[:, None] & (o_d < D)[None, :], other=0.0)
            ss += tl.sum(b_c * b_c, axis=1)
        norm = tl.sqrt(ss)
        scale = tl.where(norm > 0, 1.0 / tl.where(norm > 0, norm, 1.0), 1.0)
        tl.debug_barrier()
        for d0 in range(0, D, BD):
            o_d = d0 + tl.arange(0, BD)
            m_kd = m_k[:, None] & (o_d < D)[None, :]
            p_c = base + o_k[:, None] * D + o_d[None, :]
            b_c = tl.load(p_c, mask=m_kd, other=0.0)
            tl.store(p_c, b_c * scale[:, None], mask=m_kd)


def _interpreted() -> bool:
    from raid_fast.kernels import TRITON_INTERPRET

    return TRITON_INTERPRET


def pass_config(k: int, d: int) -> dict:
    """Block sizes of the pass kernel for k centroids of D dims (power-of-two extents, >= 16 for dots)."""
    kp = max(16, triton.next_power_of_2(k))
    bd = min(128, max(16, triton.next_power_of_2(d)))
    n_chunks = triton.cdiv(d, bd)
    n_acc = max(1, min(_MAX_ACC, n_chunks, _ACC_BUDGET // (kp * bd)))
    return {
        "KP": kp,
        "BD": bd,
        "N_ACC": n_acc,
        "BM": MAX_TILE if kp <= 64 else 64,
        "windows": triton.cdiv(n_chunks, n_acc),
    }


def _split(x: torch.Tensor, n_groups: int, max_size: int, bm: int, windows: int) -> int:
    """Programs per group, from a wave model of the GPU.

    The pass kernel holds 255 registers per thread at 8 warps (ptxas for sm_90, k = 50, D = 384),
    so one program runs per SM. A launch of P programs takes ceil(P / SMs) waves, each as long as
    one program: its ceil(tiles / split) tiles plus about one tile's worth of time writing its
    partial sums. The split with the least of that wins: for 15 groups of 640 tiles on 132 SMs it is
    17 (255 programs, two waves) where "two programs per SM" would give 18 (270 programs, three
    waves, the last one nearly empty).
    """
    tiles = max(1, triton.cdiv(max_size, bm))
    slots = sm_count(x.device)
    if slots is None:
        return min(tiles, 2)  # interpreted: still several programs per group, to test the merge
    per_split = max(1, n_groups * windows)

    def cost(split: int) -> int:
        return triton.cdiv(per_split * split, slots) * (triton.cdiv(tiles, split) + 1)

    # beyond 8 waves the model's gains are noise and the partial sums grow
    candidates = range(1, min(tiles, max(1, 8 * slots // per_split)) + 1)
    return min(candidates, key=lambda split: (cost(split), split))


def _launch_pass(x, offsets, n_groups, max_size, centroids, accumulate):
    n, d = x.shape
    k = centroids.shape[1]
    cfg = pass_config(k, d)
    c_low = centroids.to(x.dtype).contiguous()  # [G, k, D]: the rounding the semantics ask for
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    windows = cfg["windows"] if accumulate else 1
    split = _split(x, n_groups, max_size, cfg["BM"], windows)
    if accumulate:
        psum = torch.empty(n_groups, split, k, d, dtype=torch.float32, device=x.device)
        pcnt = torch.empty(n_groups, split, k, dtype=torch.int32, device=x.device)
    else:
        psum = pcnt = dist  # unused pointers
    if n_groups and (n or accumulate):
        grid = (n_groups, split, windows)
        _lloyd_pass_kernel[grid](
            x,
            offsets,
            c_low,
            dist,
            idx,
            psum,
            pcnt,
            d,
            k,
            split,
            ACCUMULATE=accumulate,
            DOT_F32=_interpreted(),
            BM=cfg["BM"],
            KP=cfg["KP"],
            BD=cfg["BD"],
            N_ACC=cfg["N_ACC"],
            num_warps=8,
            num_stages=2,
        )
    return dist, idx, psum, pcnt, split, cfg


def kmeans_assign_triton(x, groups, centroids):
    """Nearest rounded centroid of each half-precision point: (dist [N] fp32, idx [N] int64)."""
    dist, idx, *_ = _launch_pass(x, groups.offsets, groups.n_groups, groups.max_size, centroids, False)
    return dist, idx


def kmeans_step_triton(x, groups, centroids, spherical):
    """One Lloyd iteration: (dist [N], idx [N], new centroids [G, k, D] fp32, counts [G, k] int64)."""
    n_groups, k, d = centroids.shape
    dist, idx, psum, pcnt, split, cfg = _launch_pass(x, groups.offsets, n_groups, groups.max_size, centroids, True)
    out = torch.empty(n_groups, k, d, dtype=torch.float32, device=x.device)
    counts = torch.empty(n_groups, k, dtype=torch.int64, device=x.device)
    if n_groups == 0:
        return dist, idx, out, counts
    bd_reduce = min(64, max(16, triton.next_power_of_2(d)))
    _lloyd_reduce_kernel[(n_groups, triton.cdiv(d, bd_reduce))](
        psum, pcnt, out, counts, d, k, split, KP=cfg["KP"], BD=bd_reduce, num_warps=4
    )
    _lloyd_fixup_kernel[(n_groups,)](
        groups.offsets,
        out,
        counts,
        d,
        k,
        SPLIT_EPS,
        SPHERICAL=bool(spherical),
        KP=cfg["KP"],
        BD=cfg["BD"],
        num_warps=4,
    )
    return dist, idx, out, counts
