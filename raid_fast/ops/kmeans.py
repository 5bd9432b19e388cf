"""KMeans ops: assignment, update and k-means++ seeding, behind the dispatcher.

Letters: G groups, N points in all, D dims, k centroids per group (k_g = min(k, N_g) used).
Backends: ``torch`` (``raid_fast.ref``, any device), ``cpp`` (extension, CPU tensors),
``cuda`` (extension, CUDA tensors), all on float32 points; ``triton`` (``raid_fast.kernels.kmeans``)
serves ``kmeans_assign`` and ``kmeans_step`` on float16 / bfloat16 points, for
``raid_fast.kmeans(precision=...)``. The ops (``raid_fast.ops.schema``) take validated contiguous
points, group offsets on the points' device and the largest group size; the public
``kmeans_assign`` below validates user input first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raid_fast import _checks, _dispatch
from raid_fast._ragged import Groups


@dataclass
class Points:
    """Validated KMeans input: ragged float32 values plus how to give results back to the user."""

    values: torch.Tensor  # [N, D] float32, contiguous
    groups: Groups
    mode: str  # "single" ([N, D]), "batched" ([G, n, D]) or "ragged" ([N, D] + offsets)

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    def per_point(self, t: torch.Tensor) -> torch.Tensor:
        """[N] -> the user's point layout ([N], [G, n] or [N])."""
        if self.mode == "batched":
            return t.view(self.groups.n_groups, -1)
        return t

    def per_group(self, t: torch.Tensor) -> torch.Tensor:
        """[G, ...] -> [...] for a single problem, unchanged otherwise."""
        return t[0] if self.mode == "single" else t


def prepare_points(name: str, x, offsets=None, offsets_name: str = "offsets") -> Points:
    """Validates points given as [N, D], [G, N, D] or ragged [N, D] + offsets [G + 1]."""
    x = _checks.as_tensor(name, x)
    _checks.check_floating(name, x)
    if offsets is not None:
        _checks.check_ndim(name, x, (2,), "[N, D] when offsets are given")
        groups = Groups.from_offsets(offsets, x.shape[0], x.device, offsets_name)
        mode = "ragged"
        values = x
    else:
        _checks.check_ndim(name, x, (2, 3), "[N, D] or batched [G, N, D]")
        if x.dim() == 2:
            groups, mode, values = Groups.uniform(1, x.shape[0], x.device), "single", x
        else:
            groups = Groups.uniform(x.shape[0], x.shape[1], x.device)
            mode, values = "batched", x.reshape(-1, x.shape[-1])
    if values.shape[1] < 1:
        msg = f"{name} must have at least one feature dimension, got shape {tuple(x.shape)}"
        raise ValueError(msg)
    values = values.to(torch.float32)
    if not values.is_contiguous():
        values = values.contiguous()
    _checks.check_finite(name, values)
    return Points(values, groups, mode)


def prepare_centroids(name: str, c, points: Points, k: int | None = None, points_name: str = "x") -> torch.Tensor:
    """Validates centroids [k, D] (single problem) or [G, k, D]; returns float32 [G, k, D]."""
    c = _checks.as_tensor(name, c)
    _checks.check_floating(name, c)
    g, d = points.groups.n_groups, points.dim
    k_text = "k" if k is None else str(k)
    if points.mode == "single":
        _checks.check_ndim(name, c, (2,), f"[{k_text}, {d}]")
        c = c.unsqueeze(0)
        want = f"[{k_text}, {d}]"
    else:
        _checks.check_ndim(name, c, (3,), f"[{g}, {k_text}, {d}]")
        want = f"[{g}, {k_text}, {d}]"
    if c.shape[0] != g or c.shape[2] != d or c.shape[1] < 1 or (k is not None and c.shape[1] != k):
        got = tuple(c.shape[1:]) if points.mode == "single" else tuple(c.shape)
        msg = f"{name} must have shape {want} with k >= 1, got {got}"
        raise ValueError(msg)
    _checks.check_same_device(**{points_name: points.values, name: c})
    c = c.to(torch.float32).contiguous()
    _checks.check_finite(name, c)
    return c


def kmeans_assign(
    x, centroids, offsets=None, *, backend: str | None = None, prefer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (squared Euclidean) of each point, within its group.

    Args:
        x: [N, D] points, [G, N, D] batched points, or ragged [N, D] with ``offsets``.
        centroids: [k, D] for [N, D] input, else [G, k, D].
        offsets: [G + 1] int64 group boundaries for ragged ``x``.
        backend: ``None`` (auto), ``"torch"``, ``"cpp"`` or ``"cuda"``.
        prefer: a backend to use when it can serve the call, else auto (see ``raid_fast._dispatch``).

    Returns:
        ``(dist, idx)`` float32 / int64, shaped like ``x`` without its last dim; ties go to the
        smallest centroid id. Group g only uses its first min(k, N_g) centroids.

    Example:
        >>> dist, idx = raid_fast.ops.kmeans_assign(torch.randn(100, 8), torch.randn(4, 8))
    """
    points = prepare_points("x", x, offsets)
    c = prepare_centroids("centroids", centroids, points)
    groups = points.groups
    dist, idx = _dispatch.call(
        "kmeans_assign", points.values, groups.offsets, groups.max_size, c, backend=backend, prefer=prefer
    )
    return points.per_point(dist), points.per_point(idx)
