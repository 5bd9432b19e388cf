"""KMeans with faiss's shape of API, batched over independent groups, on any backend.

Letters: G groups (independent problems), N points, D dims, k centroids.

Lloyd iterations with squared Euclidean distance. ``spherical=True`` rescales centroids to unit
norm after each update (as faiss does), which is cosine k-means for unit-norm points. Seeding is
k-means++ (driven by per-group uniforms drawn from ``seed``, so every backend picks the same
points), uniform random distinct points, or given centroids. Empty clusters are re-seeded by
splitting the largest cluster (see ``raid_fast.ref.kmeans.kmeans_update_ref``).

``precision="fp16"`` or ``"bf16"`` rounds the points once, and the centroids at every assignment, to
that dtype; distances and sums are accumulated in float32 or better. On a GPU the triton backend
then reads half the bytes per iteration and runs its dots on tensor cores; every other backend
computes the same thing on the rounded values in float32, so results agree across backends.

Batched input: ``[G, N, D]`` runs G problems of equal size in one call; ragged input (``x`` [N, D]
plus ``offsets`` [G + 1]) runs groups of different sizes (one per class in the token database).
A ragged group with N_g < k points gets k_g = N_g centroids (rows k_g.. of its centroids are zero,
``n_centroids`` says how many are used) and an empty group gets none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raid_fast import _checks, _dispatch, _extras
from raid_fast.ops.kmeans import Points, kmeans_assign, prepare_centroids, prepare_points

INITS = ("k-means++", "random")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class KMeansResult:
    """Output of ``kmeans``; ``[G, ...]`` leading dims are dropped for a single [N, D] problem."""

    centroids: torch.Tensor  # [k, D] or [G, k, D] float32
    obj: torch.Tensor  # [niter + 1] or [niter + 1, G] float64 on the CPU: inertia per iteration
    counts: torch.Tensor  # [k] or [G, k] int64: points per centroid in the final assignment
    labels: torch.Tensor  # [N], [G, N] or ragged [N] int64: final assignment (group-local ids)
    n_centroids: torch.Tensor  # [G] int64: centroids used per group, min(k, N_g)


def _check_hyper(k, niter, seed, init, precision) -> tuple[int, int, int]:
    k = _checks.check_int("k", k, minimum=1)
    niter = _checks.check_int("niter", niter, minimum=0)
    seed = _checks.check_int("seed", seed)
    _checks.check_choice("init", init, INITS)
    _checks.check_choice("precision", precision, tuple(PRECISIONS))
    return k, niter, seed


@dataclass
class _LloydPoints:
    """The points the Lloyd loop reads, and the dtype centroids are rounded to before assignment."""

    values: torch.Tensor  # [N, D]: float32, or float16 / bfloat16 for the triton backend
    round_to: torch.dtype | None  # set when float32 values stand in for rounded ones

    def centroids(self, c: torch.Tensor) -> torch.Tensor:
        return c if self.round_to is None else c.to(self.round_to).float()


def _lloyd_points(points: Points, precision: str, centroids, spherical: bool, backend: str | None) -> _LloydPoints:
    low = PRECISIONS[precision]
    big = float(points.values.abs().max()) if points.values.numel() else 0.0
    if big > torch.finfo(low).max:
        msg = (
            f"x has values outside the {precision} range (max |x| = {big:.4g}); "
            "use precision='bf16' or 'fp32', or rescale the points"
        )
        raise ValueError(msg)
    # squared norms and dots accumulate in float32, whatever the storage dtype: a squared distance
    # (at most 4 max|x|^2 D) that overflows gives inf distances and wrong clusters
    if big * big * points.dim > torch.finfo(torch.float32).max / 4:
        msg = (
            f"x is too large for precision={precision!r}: squared distances would overflow float32 "
            f"(max |x| = {big:.4g}, D = {points.dim}); rescale the points"
        )
        raise ValueError(msg)
    if precision == "fp32":
        return _LloydPoints(points.values, None)
    x_low = points.values.to(low)  # [N, D]
    try:
        _dispatch.select(
            "kmeans_step", x_low, points.groups.offsets, points.groups.max_size, centroids, spherical, backend=backend
        )
    except RuntimeError:
        if backend == "triton":
            raise
        # no backend reads half-precision points here: the rounded points in float32 are the same
        # computation for any float32 backend
        return _LloydPoints(x_low.float(), low)
    return _LloydPoints(x_low, None)


def _check_sizes(name: str, points: Points, k: int) -> None:
    if points.mode == "ragged":
        return
    n = int(points.groups.max_size)
    if n == 0:
        msg = f"{name} must hold at least one point, got shape {tuple(points.values.shape)} ({points.mode} input)"
        raise ValueError(msg)
    if k > n:
        msg = f"k must be <= the number of points per problem ({n}), got k={k}"
        raise ValueError(msg)


def _seed_centroids(points: Points, k: int, seed: int, init: str, backend: str | None) -> torch.Tensor:
    """Initial centroids [G, k, D] from the seed (k-means++ or random distinct points)."""
    groups = points.groups
    gen = torch.Generator().manual_seed(seed)
    if init == "k-means++":
        uniforms = torch.rand(groups.n_groups, k, generator=gen, dtype=torch.float64)  # [G, k]
        # seeding runs on the float32 points, so the backend asked for the Lloyd loop is a preference here
        centroids, _ = _dispatch.call(
            "kmeans_plusplus", points.values, groups.offsets, groups.max_size, k, uniforms, prefer=backend
        )
        return centroids
    centroids = torch.zeros(groups.n_groups, k, points.dim, dtype=torch.float32, device=points.values.device)
    for g, (lo, n) in enumerate(zip(groups.offsets_cpu[:-1].tolist(), groups.sizes_cpu.tolist())):
        k_g = min(k, n)
        pick = torch.randperm(n, generator=gen)[:k_g] + lo  # [k_g]
        centroids[g, :k_g] = points.values[pick.to(points.values.device)]
    return centroids


def kmeans(
    x,
    k: int,
    *,
    niter: int = 25,
    seed: int = 0,
    spherical: bool = False,
    init: str = "k-means++",
    init_centroids=None,
    offsets=None,
    precision: str = "fp32",
    backend: str | None = None,
    progress: bool = False,
) -> KMeansResult:
    """Lloyd k-means on one problem, a batch of problems, or ragged groups.

    Args:
        x: [N, D] points, [G, N, D] batched problems, or ragged [N, D] with ``offsets``; float
            tensors or numpy arrays (computed in float32).
        k: centroids per problem (>= 1; <= N for dense input).
        niter: Lloyd iterations.
        seed: seeds k-means++ / random initialisation.
        spherical: unit-norm centroids after each update (cosine k-means for unit-norm points).
        init: ``"k-means++"`` or ``"random"``; ignored when ``init_centroids`` is given.
        init_centroids: [k, D] (single problem) or [G, k, D] starting centroids.
        offsets: [G + 1] int64 group boundaries for ragged ``x``.
        precision: ``"fp32"``, or ``"fp16"`` / ``"bf16"`` to round points and centroids to that
            dtype for the Lloyd iterations (the fast GPU path; see the module docstring). Seeding
            always uses the float32 points. ``"fp16"`` refuses points beyond its range (65504).
        backend: ``None`` (auto), ``"torch"``, ``"cpp"``, ``"cuda"`` or ``"triton"`` (fp16/bf16 only).
        progress: show a progress bar over iterations.

    Returns:
        A ``KMeansResult``; ``obj[t]`` is the inertia (sum of squared distances) of the assignment
        after t updates, so ``obj[0]`` is the inertia of the initial centroids.

    Example:
        >>> res = raid_fast.kmeans(torch.randn(1000, 16), 8, niter=10)
        >>> res.centroids.shape
        torch.Size([8, 16])
    """
    k, niter, seed = _check_hyper(k, niter, seed, init, precision)
    points = prepare_points("x", x, offsets)
    _check_sizes("x", points, k)
    groups = points.groups
    if init_centroids is not None:
        centroids = prepare_centroids("init_centroids", init_centroids, points, k=k)
    else:
        centroids = _seed_centroids(points, k, seed, init, backend)
    lloyd = _lloyd_points(points, precision, centroids, spherical, backend)

    obj = torch.empty(niter + 1, groups.n_groups, dtype=torch.float64, device=points.values.device)
    steps = range(niter)
    if progress:
        steps = _extras.tqdm()(steps, desc=f"kmeans k={k}", unit="iter")
    for it in steps:
        dist, _, centroids, _ = _dispatch.call(
            "kmeans_step",
            lloyd.values,
            groups.offsets,
            groups.max_size,
            lloyd.centroids(centroids),
            spherical,
            backend=backend,
        )
        obj[it] = groups.segment_sum(dist)
    dist, idx = _dispatch.call(
        "kmeans_assign", lloyd.values, groups.offsets, groups.max_size, lloyd.centroids(centroids), backend=backend
    )
    obj[niter] = groups.segment_sum(dist)

    flat = groups.group_of_value * k + idx  # [N] cluster id across groups
    counts = torch.bincount(flat, minlength=groups.n_groups * k).view(groups.n_groups, k)
    n_centroids = groups.sizes_cpu.clamp(max=k)
    return KMeansResult(
        centroids=points.per_group(centroids),
        obj=obj.cpu()[:, 0] if points.mode == "single" else obj.cpu(),
        counts=points.per_group(counts),
        labels=points.per_point(idx),
        n_centroids=n_centroids,
    )


class KMeans:
    """Faiss-like KMeans object (see ``kmeans`` for the arguments).

    Example:
        >>> km = raid_fast.KMeans(50, niter=25, spherical=True).fit(tokens)   # tokens [N, D]
        >>> dist, idx = km.assign(queries)                                     # [M], [M]
    """

    def __init__(
        self,
        k: int,
        niter: int = 25,
        seed: int = 0,
        spherical: bool = False,
        init: str = "k-means++",
        precision: str = "fp32",
        backend: str | None = None,
        progress: bool = False,
    ):
        self.k, self.niter, self.seed = _check_hyper(k, niter, seed, init, precision)
        self.spherical = bool(spherical)
        self.init = init
        self.precision = precision
        self.backend = backend
        self.progress = progress
        self.centroids: torch.Tensor | None = None
        self.obj: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.n_centroids: torch.Tensor | None = None

    def fit(self, x, init_centroids=None, offsets=None) -> KMeans:
        """Clusters ``x`` ([N, D], [G, N, D] or ragged with ``offsets``); returns ``self``."""
        res = kmeans(
            x,
            self.k,
            niter=self.niter,
            seed=self.seed,
            spherical=self.spherical,
            init=self.init,
            init_centroids=init_centroids,
            offsets=offsets,
            precision=self.precision,
            backend=self.backend,
            progress=self.progress,
        )
        self.centroids, self.obj, self.counts = res.centroids, res.obj, res.counts
        self.labels, self.n_centroids = res.labels, res.n_centroids
        return self

    def assign(self, x, offsets=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dist, idx)``: squared distance to, and id of, the nearest fitted centroid (float32)."""
        if self.centroids is None:
            msg = "KMeans.assign() needs a fitted model: call fit() first"
            raise RuntimeError(msg)
        # the backend chosen for fitting may lack float32 assignment (triton runs the half-precision
        # Lloyd loop only): here it is a preference
        return kmeans_assign(x, self.centroids, offsets, prefer=self.backend)

    def __repr__(self) -> str:
        state = "fitted" if self.centroids is not None else "not fitted"
        return f"KMeans(k={self.k}, niter={self.niter}, seed={self.seed}, spherical={self.spherical}, init={self.init!r}, precision={self.precision!r}, {state})"
