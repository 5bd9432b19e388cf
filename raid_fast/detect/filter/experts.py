"""Expert blocks and the convolutional router of the guided MoE filter.

Shape letters: B batch, D token dim, K retrieved neighbours per token (cost-volume depth),
H x W token grid, L = H * W positions, E experts in one stage.

Widths follow the authors' ``expert.py`` / ``moe1.py``:
a guidance expert maps ``2D -> D`` and concatenates its input, so the fused guidance has ``3D``
channels; a denoising expert works at width ``K`` throughout, with a gate of width ``K // 2`` and
GroupNorms of 5 groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_count(channels: int, max_groups: int = 5) -> int:
    """Largest number of GroupNorm groups ``<= max_groups`` that divides ``channels``.

    The authors use 5 groups on widths 150 and 75 (both divisible by 5, so this returns 5 there);
    other widths (small test models) fall back to the nearest divisor instead of failing.
    """
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class ConvRouter(nn.Module):
    """Per-image router: a strided conv over the map, averaged over space.

    ``Conv2d(c_in -> E, kernel 4, stride 4, bias)`` initialised to zero (uniform routing at the
    start of training), then a spatial mean: one logit vector per image, not per position.

    Args:
        in_channels: channels of the routed map.
        n_experts: number of experts E.
        patch: kernel size and stride of the conv (4 in the authors' code).

    Shapes:
        x: ``[B, C_in, H, W]`` -> logits ``[B, E]``.
    """

    def __init__(self, in_channels: int, n_experts: int, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, n_experts, kernel_size=patch, stride=patch, bias=True)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # pad bottom/right to a multiple of the stride so every position is routed and grids smaller
        # than the kernel work; a no-op on the authors' 32x32 grid
        pad_h, pad_w = (-h) % self.patch, (-w) % self.patch
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.proj(x).mean(dim=(2, 3))  # [B, E]


class GuidanceExpert(nn.Module):
    """Stage-1 guidance-fusion expert: ``Conv3x3 -> BatchNorm -> ReLU``, concatenated to its input.

    Args:
        in_channels: channels of the guidance map G0 (2D).
        out_channels: channels the conv adds (D).

    Shapes:
        x: ``[B, 2D, H, W]`` -> ``[B, 3D, H, W]`` (input first, conv features second).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm(self.conv(x)))  # [B, D, H, W]
        return torch.cat([x, y], dim=1)  # [B, 3D, H, W]


class DenoisingExpert(nn.Module):
    """Stage-2 denoising expert: guided cross-attention over the cost volume plus conv branches.

    The fused guidance gives the queries and the cost volume the keys and values; attention is
    single-head over the L spatial positions with width K. A local conv gate rescales V by
    ``1 + gate_scale * sigmoid(conv(C))``, a 1x1-conv identity path on C is added to the
    attention output before a LayerNorm, and a conv head turns the result into one probability
    per position.

    Args:
        guide_channels: channels of the fused guidance (3D).
        k: cost-volume depth K (also the attention width).
        gate_scale: strength of the conv gate on V (0.1 in the authors' code).
        max_groups: GroupNorm groups (5 in the authors' code; see ``group_count``).

    Shapes:
        guide: ``[B, 3D, H, W]``, cost: ``[B, K, H, W]`` -> probabilities ``[B, H, W]`` in [0, 1].
    """

    def __init__(self, guide_channels: int, k: int, gate_scale: float = 0.1, max_groups: int = 5) -> None:
        super().__init__()
        gate_width = max(k // 2, 1)
        self.k = k
        self.gate_scale = gate_scale
        # query path: guidance -> K channels -> tokens
        self.q_conv = nn.Conv2d(guide_channels, k, kernel_size=3, padding=1, bias=False)
        self.q_gn = nn.GroupNorm(group_count(k, max_groups), k)
        self.q_norm = nn.LayerNorm(k)
        self.q_proj = nn.Linear(k, k, bias=False)
        # key/value path: cost volume as tokens
        self.kv_norm = nn.LayerNorm(k)
        self.k_proj = nn.Linear(k, k, bias=False)
        self.v_proj = nn.Linear(k, k, bias=False)
        # local conv gate on V
        self.gate_conv1 = nn.Conv2d(k, gate_width, kernel_size=3, padding=1, bias=False)
        self.gate_gn = nn.GroupNorm(group_count(gate_width, max_groups), gate_width)
        self.gate_conv2 = nn.Conv2d(gate_width, k, kernel_size=1, bias=True)
        # identity path on the cost volume
        self.id_conv = nn.Conv2d(k, k, kernel_size=1, bias=False)
        self.id_gn = nn.GroupNorm(group_count(k, max_groups), k)
        self.out_norm = nn.LayerNorm(k)
        # head ("conv3x3" mode of the authors' code)
        self.head_conv = nn.Conv2d(k, k, kernel_size=3, padding=1, bias=False)
        self.head_gn = nn.GroupNorm(group_count(k, max_groups), k)
        self.head_out = nn.Conv2d(k, 1, kernel_size=1, bias=True)
        nn.init.zeros_(self.head_out.bias)

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, L, C]

    def forward(self, guide: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
        b, _, h, w = cost.shape
        q = F.silu(self.q_gn(self.q_conv(guide)))  # [B, K, H, W]
        q = self.q_proj(self.q_norm(self._tokens(q)))  # [B, L, K]

        c = self.kv_norm(self._tokens(cost))  # [B, L, K]
        key = self.k_proj(c)  # [B, L, K]
        value = self.v_proj(c)  # [B, L, K]

        gate = torch.sigmoid(self.gate_conv2(F.silu(self.gate_gn(self.gate_conv1(cost)))))  # [B, K, H, W]
        value = value * (1.0 + self.gate_scale * self._tokens(gate))

        # softmax(Q K^T / sqrt(K)) V, single head over the L positions
        y = F.scaled_dot_product_attention(q, key, value)  # [B, L, K]

        identity = self._tokens(self.id_gn(self.id_conv(cost)))  # [B, L, K]
        y = self.out_norm(y + identity)  # [B, L, K]

        y = y.transpose(1, 2).reshape(b, self.k, h, w)  # [B, K, H, W]
        logits = self.head_out(F.silu(self.head_gn(self.head_conv(y))))  # [B, 1, H, W]
        return torch.sigmoid(logits[:, 0])  # [B, H, W]
