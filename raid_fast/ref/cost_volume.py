"""Cost-volume reference: top-K distances laid out as an image-like volume.

Letters: B images, L = H * W query tokens per image (row-major), K neighbours.
"""

from __future__ import annotations

import torch


def cost_volume_ref(dist: torch.Tensor, h: int, w: int, pad_cost: float = 1.0) -> torch.Tensor:
    """[B, L, K] ascending 1 - cos -> [B, K, H, W]; missing neighbours (+inf) become ``pad_cost``.

    Channel k of the volume is the k-th nearest neighbour's cost at every position, so channel 0 is
    the 1-NN cost map.
    """
    b, _, k = dist.shape
    filled = torch.where(torch.isinf(dist), torch.as_tensor(pad_cost, dtype=dist.dtype, device=dist.device), dist)
    return filled.permute(0, 2, 1).reshape(b, k, h, w).contiguous()
