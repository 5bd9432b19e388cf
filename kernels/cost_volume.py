"""Cost volume in Triton: [B, L, K] top-K distances -> [B, K, H, W], +-inf -> pad_cost.

volume[b, k, y, x] = dist[b, y * W + x, k] (pad_cost where infinite), as
``raid_fast.ref.cost_volume.cost_volume_ref``. Letters: B images, L = H * W query tokens
(row-major), K neighbours; BL x BK tiles, read through the input's strides and written transposed,
so non-contiguous distances need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cost_volume_kernel(
    d_ptr,
    v_ptr,
    L,
    K,
    pad_cost,
    stride_db,
    stride_dl,
    stride_dk,
    BL: tl.constexpr,
    BK: tl.constexpr,
):
    # volume[b, k, l] = dist[b, l, k], or pad_cost where dist[b, l, k] is infinite
    i_b = tl.program_id(0).to(tl.int64)
    i_l = tl.program_id(1).to(tl.int64)
    i_k = tl.program_id(2).to(tl.int64)
    o_l = i_l * BL + tl.arange(0, BL)  # [BL]
    o_k = i_k * BK + tl.arange(0, BK)  # [BK]
    m_lk = (o_l < L)[:, None] & (o_k < K)[None, :]  # [BL, BK]
    p_d = d_ptr + i_b * stride_db + o_l[:, None] * stride_dl + o_k[None, :] * stride_dk
    b_d = tl.load(p_d, mask=m_lk, other=0.0)  # [BL, BK]
    b_v = tl.where(tl.abs(b_d) == float("inf"), pad_cost, b_d)
    p_v = v_ptr + i_b * K * L + o_k[None, :] * L + o_l[:, None]
    tl.store(p_v, b_v, mask=m_lk)


def cost_volume_triton(dist: torch.Tensor, h: int, w: int, pad_cost: float = 1.0) -> torch.Tensor:
    """[B, L, K] float32 distances (any strides) -> [B, K, H, W] float32; ``+-inf`` -> ``pad_cost``."""
    b, n_pos, k = dist.shape
    volume = torch.empty((b, k, h, w), dtype=torch.float32, device=dist.device)
    if volume.numel() == 0:
        return volume
    bl, bk = 64, 32
    # b may be large, so it takes grid axis 0 (the others are limited to 65535)
    grid = (b, triton.cdiv(n_pos, bl), triton.cdiv(k, bk))
    _cost_volume_kernel[grid](dist, volume, n_pos, k, float(pad_cost), *dist.stride(), BL=bl, BK=bk)
    return volume
