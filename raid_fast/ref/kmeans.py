"""Pure-torch KMeans reference: the oracle every KMeans backend is tested against.

Letters: G groups, N points in all, N_g points of group g, D dims, k centroids,
k_g = min(k, N_g) centroids used by group g. Points are ragged groups (``x`` [N, D] plus
``offsets`` [G + 1], see ``raid_fast._ragged``); centroids are [G, k, D], rows >= k_g are zero.
Distances are squared Euclidean; ties go to the smallest centroid index. Readable, not fast:
distances in float64, Python loops over groups and over empty clusters.
"""

from __future__ import annotations

import torch

# relative perturbation of the faiss-style split that re-seeds an empty cluster (csrc kSplitEps)
SPLIT_EPS = 1.0 / 1024.0


def _bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    off = offsets.tolist()
    return list(zip(off[:-1], off[1:]))


def kmeans_assign_ref(
    x: torch.Tensor, offsets: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each point within its group.

    Args:
        x: [N, D] float32 points.
        offsets: [G + 1] int64 group boundaries.
        centroids: [G, k, D] float32.

    Returns:
        dist [N] float32 squared distance to the nearest centroid, idx [N] int64 group-local id.
    """
    n, _ = x.shape
    k = centroids.shape[1]
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    # chunking keeps the [chunk, k] float64 block bounded
    chunk = max(1, (1 << 22) // max(k, 1))
    for g, (lo, hi) in enumerate(_bounds(offsets)):
        k_g = min(k, hi - lo)
        c = centroids[g, :k_g].double()  # [k_g, D]
        for s in range(lo, hi, chunk):
            e = min(hi, s + chunk)
            d2 = torch.cdist(x[s:e].double(), c).square()  # [chunk, k_g]
            # torch.min returns the first minimum, the smallest index on ties
            best, arg = d2.min(dim=1)
            dist[s:e] = best.clamp_min(0).float()
            idx[s:e] = arg
    return dist, idx


def kmeans_update_ref(
    x: torch.Tensor, offsets: torch.Tensor, idx: torch.Tensor, k: int, spherical: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lloyd update: means of the assigned points, empty clusters split from the largest.

    Empty cluster j (ascending j) takes a copy of the largest cluster m (largest working count,
    smallest index on ties), perturbed by (1 + eps) on even dims and (1 - eps) on odd dims while m
    gets the opposite; the working count of m is halved between them (faiss's split_clusters, made
    deterministic). Spherical: rows are then scaled to unit norm.

    Args:
        x: [N, D] float32 points. offsets: [G + 1] int64. idx: [N] int64 group-local assignment.
        k: centroids per group. spherical: unit-norm centroids.

    Returns:
        centroids [G, k, D] float32 (rows >= k_g zero), counts [G, k] int64 (before splitting).
    """
    d = x.shape[1]
    bounds = _bounds(offsets)
    centroids = torch.zeros(len(bounds), k, d, dtype=torch.float32, device=x.device)
    counts = torch.zeros(len(bounds), k, dtype=torch.int64, device=x.device)
    sign = torch.ones(d, dtype=torch.float64, device=x.device)
    sign[1::2] = -1.0  # [D] +1 on even dims, -1 on odd dims
    for g, (lo, hi) in enumerate(bounds):
        k_g = min(k, hi - lo)
        if k_g == 0:
            continue
        cnt = torch.bincount(idx[lo:hi], minlength=k_g)[:k_g]  # [k_g]
        sums = torch.zeros(k_g, d, dtype=torch.float64, device=x.device)
        sums.index_add_(0, idx[lo:hi], x[lo:hi].double())
        c = sums / cnt.clamp_min(1).unsqueeze(1).double()  # [k_g, D]
        counts[g, :k_g] = cnt
        work = cnt.tolist()
        for j in range(k_g):
            if work[j] != 0:
                continue
            m = max(range(k_g), key=lambda jj: (work[jj], -jj))
            c[j] = c[m] * (1.0 + SPLIT_EPS * sign)
            c[m] = c[m] * (1.0 - SPLIT_EPS * sign)
            work[j] = work[m] // 2
            work[m] -= work[j]
        if spherical:
            norm = c.norm(dim=1, keepdim=True)
            c = torch.where(norm > 0, c / torch.where(norm > 0, norm, 1.0), c)
        centroids[g, :k_g] = c.float()
    return centroids, counts


def kmeans_plusplus_ref(
    x: torch.Tensor, offsets: torch.Tensor, k: int, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding driven by given uniforms, so every backend picks the same points.

    Step 0 picks point floor(u0 * N_g). Step t picks the smallest i whose running sum of mind
    (float64, in index order) exceeds u_t * sum(mind), where mind is the float32 squared distance to
    the nearest chosen point; when every mind is 0 it falls back to floor(u_t * N_g).

    Args:
        x: [N, D] float32. offsets: [G + 1] int64. k: centroids per group.
        uniforms: [G, k] float64 in [0, 1).

    Returns:
        centroids [G, k, D] float32 (rows >= k_g zero), chosen [G, k] int64 group-local ids (-1 unused).
    """
    d = x.shape[1]
    bounds = _bounds(offsets)
    centroids = torch.zeros(len(bounds), k, d, dtype=torch.float32, device=x.device)
    chosen = torch.full((len(bounds), k), -1, dtype=torch.int64, device=x.device)
    u = uniforms.double().cpu()
    for g, (lo, hi) in enumerate(bounds):
        n = hi - lo
        k_g = min(k, n)
        if k_g == 0:
            continue
        xg = x[lo:hi]  # [N_g, D]
        pick = min(int(u[g, 0] * n), n - 1)
        picks = [pick]
        mind = (xg - xg[pick]).square().sum(dim=1)  # [N_g] float32
        for t in range(1, k_g):
            cum = torch.cumsum(mind.double(), dim=0)  # [N_g]
            total = float(cum[-1])
            if total > 0:
                target = float(u[g, t]) * total
                pick = int(
                    torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64, device=cum.device), right=True)
                )
                if pick >= n:
                    pick = int(torch.nonzero(mind > 0).max())
            else:
                pick = min(int(u[g, t] * n), n - 1)
            picks.append(pick)
            mind = torch.minimum(mind, (xg - xg[pick]).square().sum(dim=1))
        sel = torch.tensor(picks, dtype=torch.int64, device=x.device)
        centroids[g, :k_g] = xg[sel]
        chosen[g, :k_g] = sel
    return centroids, chosen
