"""Class routing, query normalisation and top-P prototype probing in one Triton launch.

c_b = argmax_c cos(cls_b, class_c) (first c on ties; or given), qn = q / max(||q||, 1e-12),
probes[m] = the P slots s of class c_b with the largest qn_m . sem[c_b, s] + bias[c_b, s] (ties to
the smallest s), proto[m] = sem[c_b, probes[m, 0]], as ``raid_fast.ref.probe.probe_prototypes_ref``.
Letters: B images, L tokens per image, M = B * L query tokens, D dims, C classes, S prototype slots
per class (SP = S padded to a power of two), P probes. The kernel: docs/kernels.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# P rounds of argmax over at most MAX_SLOTS prototype slots per class
MAX_SLOTS = 256
# routing scores one [CP, BD] block of class prototypes at a time
MAX_CLASSES = 256


@triton.jit
def _probe_kernel(
    q_ptr,
    sem_ptr,
    bias_ptr,
    ids_ptr,
    cls_ptr,
    cproto_ptr,
    qn_ptr,
    probes_ptr,
    proto_ptr,
    L,
    D,
    S,
    P,
    C,
    stride_qb,
    stride_ql,
    stride_qd,
    stride_cb,
    stride_cd,
    ROUTE: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    SP: tl.constexpr,
    CP: tl.constexpr,
    BDC: tl.constexpr,
):
    # q [B, L, D] (strided); sem [C, S, D], bias [C, S] (0 or -inf); ids [B] int64 class per image
    # (written when ROUTE, from cls [B, D] (strided) and cproto [C, D]); qn [M, D], proto [M, D] fp32;
    # probes [M, P] int64 global list ids (class * S + slot, -1 unused)
    i_b = tl.program_id(0).to(tl.int64)
    i_l = tl.program_id(1)
    o_l = i_l * BM + tl.arange(0, BM)  # [BM]
    m_l = o_l < L
    o_m = i_b * L + o_l  # [BM] rows of the outputs
    if ROUTE:
        o_c = tl.arange(0, CP)
        m_c = o_c < C
        sc = tl.zeros([CP], dtype=tl.float32)
        ssc = tl.zeros([BDC], dtype=tl.float32)
        for d0 in range(0, D, BDC):
            o_d = d0 + tl.arange(0, BDC)
            m_d = o_d < D
            b_cls = tl.load(cls_ptr + i_b * stride_cb + o_d * stride_cd, mask=m_d, other=0.0)  # [BDC]
            b_cp = tl.load(cproto_ptr + o_c[:, None] * D + o_d[None, :], mask=m_c[:, None] & m_d[None, :], other=0.0)
            sc += tl.sum(b_cp * b_cls[None, :], axis=1)
            ssc += b_cls * b_cls
        sc = sc * (1.0 / tl.maximum(tl.sqrt(tl.sum(ssc, axis=0)), 1e-12))
        sc = tl.where(m_c, sc, float("-inf"))
        c = tl.argmax(sc, axis=0, tie_break_left=True).to(tl.int64)
        tl.store(ids_ptr + i_b, c, mask=i_l == 0)
    else:
        c = tl.load(ids_ptr + i_b)
    o_s = tl.arange(0, SP)
    m_s = o_s < S
    p_q = q_ptr + i_b * stride_qb + o_l[:, None] * stride_ql  # [BM, 1]
    p_sem = sem_ptr + c * S * D + o_s[:, None] * D  # [SP, 1]

    ss = tl.zeros([BM], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        b_q = tl.load(p_q + o_d[None, :] * stride_qd, mask=m_l[:, None] & (o_d < D)[None, :], other=0.0)
        ss += tl.sum(b_q * b_q, axis=1)
    inv = 1.0 / tl.maximum(tl.sqrt(ss), 1e-12)  # [BM]: F.normalize's eps

    score = tl.zeros([BM, SP], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m_d = o_d < D
        b_q = tl.load(p_q + o_d[None, :] * stride_qd, mask=m_l[:, None] & m_d[None, :], other=0.0)
        b_qn = b_q * inv[:, None]  # [BM, BD]
        tl.store(qn_ptr + o_m[:, None] * D + o_d[None, :], b_qn, mask=m_l[:, None] & m_d[None, :])
        b_sem = tl.load(p_sem + o_d[None, :], mask=m_s[:, None] & m_d[None, :], other=0.0)  # [SP, BD]
        score += tl.dot(b_qn, tl.trans(b_sem), input_precision="ieee")
    b_bias = tl.load(bias_ptr + c * S + o_s, mask=m_s, other=float("-inf"))  # [SP]
    score = score + b_bias[None, :]

    for r in range(0, P):
        best = tl.max(score, axis=1)  # [BM]
        j = tl.argmax(score, axis=1, tie_break_left=True)  # [BM]
        probe = tl.where(best == float("-inf"), -1, c * S + j)
        tl.store(probes_ptr + o_m * P + r, probe, mask=m_l)
        if r == 0:
            # every class has at least one prototype: the top-1 is always a real slot
            p_top = sem_ptr + (c * S + j)[:, None].to(tl.int64) * D  # [BM, 1]
            for d0 in range(0, D, BD):
                o_d = d0 + tl.arange(0, BD)
                m_ld = m_l[:, None] & (o_d < D)[None, :]
                b_top = tl.load(p_top + o_d[None, :], mask=m_ld, other=0.0)
                tl.store(proto_ptr + o_m[:, None] * D + o_d[None, :], b_top, mask=m_ld)
        score = tl.where(o_s[None, :] == j[:, None], float("-inf"), score)


def probe_prototypes_triton(
    queries, semantic_prototypes, bias, class_ids, p, min_used=0, query_cls=None, class_prototypes=None
):
    """Same arguments and results as ``probe_prototypes_ref``: (class_ids [B], qn [M, D], probes
    [B, L, P], proto [B, L, D]); ``min_used`` is not needed here (the kernel tests each probe)."""
    b, n_pos, d = queries.shape
    n_cls, s = semantic_prototypes.shape[:2]
    dev = queries.device
    semantic_prototypes, bias = semantic_prototypes.contiguous(), bias.contiguous()
    route = class_ids is None
    if route:
        class_ids = torch.empty(b, dtype=torch.int64, device=dev)
        class_prototypes = class_prototypes.contiguous()
    else:
        class_ids = class_ids.contiguous()
    qn = torch.empty(b * n_pos, d, dtype=torch.float32, device=dev)
    probes = torch.empty(b, n_pos, p, dtype=torch.int64, device=dev)
    proto = torch.empty(b, n_pos, d, dtype=torch.float32, device=dev)
    if b == 0:
        return class_ids, qn, probes, proto
    sp = max(16, triton.next_power_of_2(s))
    bm = 32 if sp <= 64 else 16
    bd = min(64, max(16, triton.next_power_of_2(d)))
    cp = max(16, triton.next_power_of_2(n_cls))
    # a [CP, BDC] block of class prototypes in registers: at most 4096 floats
    bdc = max(16, min(bd, 4096 // cp))
    # an image without tokens still gets its class routed, by one program
    grid = (b, max(1, triton.cdiv(n_pos, bm)))
    _probe_kernel[grid](
        queries,
        semantic_prototypes,
        bias,
        class_ids,
        query_cls if route else queries,
        class_prototypes if route else queries,
        qn,
        probes,
        proto,
        n_pos,
        d,
        s,
        p,
        n_cls,
        *queries.stride(),
        *(query_cls.stride() if route else (0, 0)),
        ROUTE=route,
        BM=bm,
        BD=bd,
        SP=sp,
        CP=cp,
        BDC=bdc,
        num_warps=4,
    )
    return class_ids, qn, probes, proto
