"""Score map -> pixel anomaly map and image score (the authors' post-processing, anomalib's shape).

Letters: B images, h x w token grid, H x W input image size.
The low-resolution score map S [B, h, w] is upsampled bilinearly (align_corners=True, as the
authors' code) to the input size and smoothed with a Gaussian of sigma 4 (scipy's
``gaussian_filter`` with its default 'reflect' boundary and a radius of int(4 * sigma + 0.5));
the image score is the mean of the top 1 % of S, taken on the token grid before smoothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raid_fast import _checks


def gaussian_kernel1d(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """[2r + 1] normalised Gaussian taps, r = int(4 * sigma + 0.5) (scipy's truncate=4)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _symmetric_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded by ``radius`` on both sides with scipy's 'reflect'
    (half-sample symmetric: d c b a | a b c d | d c b a), valid for any radius, even > n."""
    i = torch.arange(-radius, n + radius, device=device)
    j = torch.remainder(i, 2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W] maps, equal to scipy.ndimage.gaussian_filter per map."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel1d(sigma, maps.dtype, maps.device)
    radius = kernel.numel() // 2
    b, h, w = maps.shape
    x = maps[:, _symmetric_index(h, radius, maps.device)]  # [B, H + 2r, W]
    x = F.conv2d(x.unsqueeze(1), kernel.view(1, 1, -1, 1))  # [B, 1, H, W]
    x = x[..., _symmetric_index(w, radius, maps.device)]  # [B, 1, H, W + 2r]
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.view(b, h, w)


def top_percent_mean(score_map: torch.Tensor, percent: float = 1.0) -> torch.Tensor:
    """[B, h, w] -> [B]: mean of the top ``percent`` % of each map (at least one value)."""
    flat = score_map.flatten(1)
    n = max(1, int(flat.shape[1] * percent / 100.0))
    return flat.topk(n, dim=1).values.mean(dim=1)


class AnomalyMapGenerator(nn.Module):
    """[B, h, w] score map -> [B, H, W] pixel anomaly map (bilinear upsampling, Gaussian blur).

    Args:
        sigma: standard deviation of the Gaussian blur in pixels of the output (4 as the paper).
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        if not sigma >= 0:
            msg = f"sigma must be >= 0, got {sigma}"
            raise ValueError(msg)
        self.sigma = float(sigma)

    def forward(self, score_map: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        _checks.check_ndim("score_map", score_map, (3,), "[B, h, w]")
        up = F.interpolate(score_map.unsqueeze(1), size=tuple(image_size), mode="bilinear", align_corners=True)
        return gaussian_blur(up.squeeze(1), self.sigma)
