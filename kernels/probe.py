"""Query normalisation and top-P prototype probing in one Triton launch.

Letters: B images, L tokens per image, M = B * L query tokens, D dims, C classes, S prototype slots
per class (SP = S padded to a power of two), P probes. Semantics:
``raid_fast.ref.probe.probe_prototypes_ref``.

At batch 1 on a GPU the hierarchical retrieve is launch-bound: normalising the queries and scoring,
ranking and gathering the prototypes of each token's class took ten small torch launches. Here
``_probe_kernel``, grid (B, cdiv(L, BM)), does it for BM tokens of one image in one program: the
squared norms over D chunks, then per chunk the normalised tokens (stored) and their dot with the
class's prototypes [SP, BD] (fp32, exact products), then P rounds of a row argmax (ties to the
smallest slot, as the ranks of a descending top-P) and the top-1 prototype rows gathered.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# P rounds of argmax over at most MAX_SLOTS prototype slots per class
MAX_SLOTS = 256


@triton.jit
def _probe_kernel(
    q_ptr,
    sem_ptr,
    bias_ptr,
    ids_ptr,
    qn_ptr,
    probes_ptr,
    proto_ptr,
    L,
    D,
    S,
    P,
    stride_qb,
    stride_ql,
    stride_qd,
    BM: tl.constexpr,
    BD: tl.constexpr,
    SP: tl.constexpr,
):
    # q [B, L, D] (strided); sem [C, S, D], bias [C, S] (0 or -inf); ids [B] int64 class per image;
    # qn [M, D], proto [M, D] fp32; probes [M, P] int64 global list ids (class * S + slot, -1 unused)
    i_b = tl.program_id(0).to(tl.int64)
    i_l = tl.program_id(1)
    o_l = i_l * BM + tl.arange(0, BM)  # [BM]
    m_l = o_l < L
    o_m = i_b * L + o_l  # [BM] rows of the outputs
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


def probe_prototypes_triton(queries, semantic_prototypes, bias, class_ids, p, min_used=0):
    """Same arguments and results as ``probe_prototypes_ref``: (qn [M, D], probes [B, L, P], proto
    [B, L, D]); ``min_used`` is not needed here (the kernel tests each probe)."""
    b, n_pos, d = queries.shape
    s = semantic_prototypes.shape[1]
    dev = queries.device
    semantic_prototypes, bias, class_ids = semantic_prototypes.contiguous(), bias.contiguous(), class_ids.contiguous()
    qn = torch.empty(b * n_pos, d, dtype=torch.float32, device=dev)
    probes = torch.empty(b, n_pos, p, dtype=torch.int64, device=dev)
    proto = torch.empty(b, n_pos, d, dtype=torch.float32, device=dev)
    if b * n_pos == 0:
        return qn, probes, proto
    sp = max(16, triton.next_power_of_2(s))
    bm = 32 if sp <= 64 else 16
    bd = min(64, max(16, triton.next_power_of_2(d)))
    grid = (b, triton.cdiv(n_pos, bm))
    _probe_kernel[grid](
        queries,
        semantic_prototypes,
        bias,
        class_ids,
        qn,
        probes,
        proto,
        n_pos,
        d,
        s,
        p,
        *queries.stride(),
        BM=bm,
        BD=bd,
        SP=sp,
        num_warps=4,
    )
    return qn, probes, proto
