"""Score map -> pixel anomaly map and image score (the authors' post-processing, anomalib's shape).

Letters: B images, h x w token grid, H x W input image size.
The low-resolution score map S [B, h, w] is upsampled bilinearly to the input size and smoothed
with a Gaussian of sigma 4 (scipy's ``gaussian_filter`` with its default 'reflect' boundary and a
radius of int(4 * sigma + 0.5)). The upsampling keeps each token's value at the centre of the
pixels it covers (``align_corners=False``); the authors' code pins the corner tokens to the
corner pixels instead (``align_corners=True``), which shifts the map by up to half a token towards
the border and cost 4.5 points of P-AP at stride 16 on the embedded data (docs/quality.md); it
stays available as an option. The image score reduces S on the token grid, before smoothing (see
:func:`image_score`): by default the mean of its top 1 %.
"""

from __future__ import annotations

import re

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


DEFAULT_IMAGE_SCORE = "top1%"
_SCORE_SPEC = re.compile(r"^(?:max|top(\d+)|top(\d+(?:\.\d+)?)%)$")


class ImageScore:
    """An image-score reduction ``[B, h, w] -> [B]``, parsed once from its spec: ``"max"`` (the largest
    token score, PatchCore's), ``"top<k>"`` (the mean of the k largest, k >= 1; the whole map when
    k exceeds h * w) or ``"top<p>%"`` (the mean of the top p % of the tokens, at least one,
    0 < p <= 100; the authors' ``"top1%"``). The call is plain tensor code, so compiled and exported
    detectors trace it.

    Raises:
        ValueError: any other spec.
    """

    def __init__(self, spec: str = DEFAULT_IMAGE_SCORE) -> None:
        m = _SCORE_SPEC.match(spec) if isinstance(spec, str) else None
        top = None if m is None or m.group(1) is None else int(m.group(1))
        percent = None if m is None or m.group(2) is None else float(m.group(2))
        if m is None or (top is not None and top < 1) or (percent is not None and not 0.0 < percent <= 100.0):
            msg = f"image_score must be 'max', 'top<k>' (k >= 1) or 'top<p>%' (0 < p <= 100), got {spec!r}"
            raise ValueError(msg)
        self.spec, self.top, self.percent = spec, top, percent

    def __call__(self, score_map: torch.Tensor) -> torch.Tensor:
        if self.percent is not None:
            return top_percent_mean(score_map, self.percent)
        flat = score_map.flatten(1)  # [B, L]
        if self.top is None:
            return flat.amax(dim=1)
        return flat.topk(min(self.top, flat.shape[1]), dim=1).values.mean(dim=1)

    def __repr__(self) -> str:
        return f"ImageScore({self.spec!r})"


def image_score(score_map: torch.Tensor, spec: str = DEFAULT_IMAGE_SCORE) -> torch.Tensor:
    """[B, h, w] -> [B]: each map reduced to one score as ``spec`` says (see :class:`ImageScore`)."""
    return ImageScore(spec)(score_map)


class AnomalyMapGenerator(nn.Module):
    """[B, h, w] score map -> [B, H, W] pixel anomaly map (bilinear upsampling, Gaussian blur).

    Args:
        sigma: standard deviation of the Gaussian blur in pixels of the output (4 as the paper).
        align_corners: False (default): token values at the centres of the pixels they cover; True:
            the authors' corner-to-corner resampling (see the module docstring).
    """

    def __init__(self, sigma: float = 4.0, align_corners: bool = False) -> None:
        super().__init__()
        if not sigma >= 0:
            msg = f"sigma must be >= 0, got {sigma}"
            raise ValueError(msg)
        self.sigma = float(sigma)
        self.align_corners = bool(align_corners)

    def forward(self, score_map: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        _checks.check_ndim("score_map", score_map, (3,), "[B, h, w]")
        up = F.interpolate(
            score_map.unsqueeze(1), size=tuple(image_size), mode="bilinear", align_corners=self.align_corners
        )
        return gaussian_blur(up.squeeze(1), self.sigma)
