"""KMeans: every backend against the torch reference, the reference against scikit-learn, errors."""

import pytest
import torch

import raid_fast
from raid_fast import _dispatch
from raid_fast._ragged import Groups
from raid_fast.ref.kmeans import kmeans_assign_ref, kmeans_plusplus_ref, kmeans_update_ref
from tests.utils import (
    assert_assign_equal_up_to_ties,
    assert_close_verbose,
    backend_params,
    blobs,
    device_of,
)


def float32_backends(op: str) -> list:
    """Backends of ``op`` on float32 points; triton runs the half-precision path
    (tests/test_kmeans_triton.py)."""
    return [param for param in backend_params(op) if param.id != "triton"]


# (group sizes, D, k): odd sizes, N=1, k=1, k=N, D=3, D=384, ragged with an empty group and N_g < k
SHAPES = [
    ((1,), 3, 1),
    ((7,), 3, 7),
    ((100,), 60, 7),
    ((257,), 384, 50),
    ((5, 0, 40, 3), 17, 6),
    ((33, 64, 1), 8, 1),
]
SHAPE_IDS = [f"N{'-'.join(map(str, s))}-D{d}-k{k}" for s, d, k in SHAPES]


def make_groups(sizes, d, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), d, generator=gen).to(device)  # [N, D]
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    return x, Groups.from_offsets(offsets, x.shape[0], x.device)


def random_centroids(groups: Groups, k: int, d: int, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(groups.n_groups, k, d, generator=gen)
    for g, n in enumerate(groups.sizes_cpu.tolist()):
        c[g, min(k, n) :] = 0
    return c.to(device)


@pytest.mark.parametrize("backend", float32_backends("kmeans_assign"))
@pytest.mark.parametrize("sizes,d,k", SHAPES, ids=SHAPE_IDS)
def test_assign_matches_reference(backend, sizes, d, k):
    dev = device_of(backend)
    x, groups = make_groups(sizes, d, dev)
    c = random_centroids(groups, k, d, dev)
    dist, idx = _dispatch.call("kmeans_assign", x, groups.offsets, groups.max_size, c, backend=backend)
    ref_dist, ref_idx = kmeans_assign_ref(x.cpu(), groups.offsets_cpu, c.cpu())
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    assert_close_verbose("dist", dist, ref_dist, atol=1e-3, rtol=1e-4)
    assert_assign_equal_up_to_ties(x, c, groups.offsets_cpu, idx, ref_idx)
    k_used = groups.sizes_cpu.clamp(max=k)
    per_point = torch.repeat_interleave(k_used, groups.sizes_cpu)
    assert bool((idx.cpu() >= 0).all()) and bool((idx.cpu() < per_point).all())


@pytest.mark.parametrize("backend", float32_backends("kmeans_assign"))
def test_assign_ties_pick_smallest_index(backend):
    dev = device_of(backend)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], device=dev)
    # centroids 0 and 2 are duplicates, 1 and 3 too: exact ties
    c = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]], device=dev)
    groups = Groups.uniform(1, 3, x.device)
    _, idx = _dispatch.call("kmeans_assign", x, groups.offsets, groups.max_size, c, backend=backend)
    assert idx.cpu().tolist() == [0, 1, 0]


@pytest.mark.parametrize("backend", float32_backends("kmeans_update"))
@pytest.mark.parametrize("spherical", [False, True], ids=["l2", "spherical"])
@pytest.mark.parametrize("sizes,d,k", SHAPES, ids=SHAPE_IDS)
def test_update_matches_reference(backend, sizes, d, k, spherical):
    dev = device_of(backend)
    x, groups = make_groups(sizes, d, dev)
    gen = torch.Generator().manual_seed(3)
    # assignments that leave some clusters empty, to exercise the split rule
    k_used = groups.sizes_cpu.clamp(max=k)
    idx = torch.cat(
        [
            torch.randint(0, max(1, (kg + 1) // 2), (n,), generator=gen)
            for n, kg in zip(groups.sizes_cpu.tolist(), k_used.tolist())
        ]
    )
    idx = idx.to(dev)
    c, counts = _dispatch.call("kmeans_update", x, groups.offsets, groups.max_size, idx, k, spherical, backend=backend)
    ref_c, ref_counts = kmeans_update_ref(x.cpu(), groups.offsets_cpu, idx.cpu(), k, spherical)
    assert torch.equal(counts.cpu(), ref_counts)
    assert_close_verbose("centroids", c, ref_c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", float32_backends("kmeans_step"))
@pytest.mark.parametrize("spherical", [False, True], ids=["l2", "spherical"])
@pytest.mark.parametrize("sizes,d,k", SHAPES, ids=SHAPE_IDS)
def test_step_matches_assign_then_update_reference(backend, sizes, d, k, spherical):
    dev = device_of(backend)
    x, groups = make_groups(sizes, d, dev)
    # centroids on data points, a few duplicated, so that some clusters end up empty and split
    c = torch.zeros(groups.n_groups, k, d)
    for g, (lo, n) in enumerate(zip(groups.offsets_cpu[:-1].tolist(), groups.sizes_cpu.tolist())):
        k_g = min(k, n)
        c[g, :k_g] = x.cpu()[lo + torch.arange(k_g) // 2]
    c = c.to(dev)
    dist, idx, new_c, counts = _dispatch.call(
        "kmeans_step", x, groups.offsets, groups.max_size, c, spherical, backend=backend
    )
    ref_dist, ref_idx = kmeans_assign_ref(x.cpu(), groups.offsets_cpu, c.cpu())
    assert_close_verbose("dist", dist, ref_dist, atol=1e-3, rtol=1e-4)
    assert_assign_equal_up_to_ties(x, c, groups.offsets_cpu, idx, ref_idx)
    # the update is checked from the backend's own assignment, which may differ from the ref on ties
    ref_c, ref_counts = kmeans_update_ref(x.cpu(), groups.offsets_cpu, idx.cpu(), k, spherical)
    assert torch.equal(counts.cpu(), ref_counts)
    assert_close_verbose("centroids", new_c, ref_c, atol=1e-5, rtol=1e-5)


def test_update_split_rule_by_hand():
    # three points in cluster 0, cluster 1 empty: cluster 1 becomes a perturbed copy of cluster 0
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    groups = Groups.uniform(1, 3, x.device)
    c, counts = kmeans_update_ref(x, groups.offsets_cpu, torch.tensor([0, 0, 0]), 2, False)
    eps = 1 / 1024
    assert counts.tolist() == [[3, 0]]
    expected = torch.tensor([[[3 * (1 - eps), 4 * (1 + eps)], [3 * (1 + eps), 4 * (1 - eps)]]])
    assert torch.allclose(c, expected)


@pytest.mark.parametrize("backend", float32_backends("kmeans_plusplus"))
@pytest.mark.parametrize("sizes,d,k", [((300,), 16, 10), ((50, 0, 120, 2), 5, 8), ((1,), 3, 1), ((9,), 4, 9)])
def test_plusplus_matches_reference(backend, sizes, d, k):
    dev = device_of(backend)
    x, groups = make_groups(sizes, d, dev, seed=5)
    u = torch.rand(groups.n_groups, k, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    c, chosen = _dispatch.call("kmeans_plusplus", x, groups.offsets, groups.max_size, k, u, backend=backend)
    ref_c, ref_chosen = kmeans_plusplus_ref(x.cpu(), groups.offsets_cpu, k, u)
    assert torch.equal(chosen.cpu(), ref_chosen)
    assert_close_verbose("centroids", c, ref_c, atol=0, rtol=0)
    # k-means++ picks distinct points on data without duplicates
    for g, n in enumerate(groups.sizes_cpu.tolist()):
        picks = ref_chosen[g, : min(k, n)]
        assert picks.unique().numel() == picks.numel()


@pytest.mark.parametrize("backend", float32_backends("kmeans_assign"))
@pytest.mark.parametrize("spherical", [False, True], ids=["l2", "spherical"])
def test_fit_matches_reference_with_same_init(backend, spherical):
    dev = device_of(backend)
    x = blobs(3, 400, 24, centers=6, seed=2).to(dev)  # [G, n, D]
    if spherical:
        x = torch.nn.functional.normalize(x, dim=-1)
    init = x[:, :6].clone()
    fast = raid_fast.kmeans(x, 6, niter=8, init_centroids=init, spherical=spherical, backend=backend)
    ref = raid_fast.kmeans(x.cpu(), 6, niter=8, init_centroids=init.cpu(), spherical=spherical, backend="torch")
    assert_close_verbose("centroids", fast.centroids, ref.centroids, atol=1e-4, rtol=1e-4)
    assert_close_verbose("obj", fast.obj, ref.obj, atol=1e-3, rtol=1e-5)
    assert torch.equal(fast.labels.cpu(), ref.labels)
    assert torch.equal(fast.counts.cpu(), ref.counts)


@pytest.mark.parametrize("backend", float32_backends("kmeans_assign"))
def test_fit_kmeansplusplus_same_on_every_backend(backend):
    dev = device_of(backend)
    x = blobs(2, 300, 10, centers=5, seed=4)
    fast = raid_fast.kmeans(x.to(dev), 5, niter=5, seed=11, backend=backend)
    ref = raid_fast.kmeans(x, 5, niter=5, seed=11, backend="torch")
    assert_close_verbose("centroids", fast.centroids, ref.centroids, atol=1e-4, rtol=1e-4)


def test_reference_matches_sklearn_inertia():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 32, generator=gen)
    init = x[torch.randperm(3000, generator=gen)[:20]].clone()
    ours = raid_fast.kmeans(x, 20, niter=15, init_centroids=init, backend="torch")
    sk = sklearn_cluster.KMeans(20, init=init.numpy(), n_init=1, max_iter=15, tol=0.0, algorithm="lloyd").fit(x.numpy())
    # sklearn stops early only when the assignment no longer changes, so the final objectives agree
    assert abs(float(ours.obj[-1]) - sk.inertia_) <= 1e-3 * sk.inertia_
    assert_close_verbose("centroids", ours.centroids, torch.from_numpy(sk.cluster_centers_), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", float32_backends("kmeans_assign"))
def test_objective_never_increases(backend):
    dev = device_of(backend)
    x = torch.randn(2, 600, 12).to(dev)
    res = raid_fast.kmeans(x, 9, niter=12, seed=3, backend=backend)
    diffs = res.obj[1:] - res.obj[:-1]  # [niter, G]
    assert bool((diffs <= 1e-6 * res.obj[:-1]).all()), res.obj
    unit = torch.nn.functional.normalize(x, dim=-1)
    res = raid_fast.kmeans(unit, 9, niter=12, seed=3, spherical=True, backend=backend)
    assert bool((res.obj[1:] - res.obj[:-1] <= 1e-6 * res.obj[:-1]).all()), res.obj
    assert torch.allclose(res.centroids.norm(dim=-1).cpu(), torch.ones(2, 9), atol=1e-5)


def test_determinism_by_seed():
    x = torch.randn(500, 8)
    a = raid_fast.kmeans(x, 6, seed=1)
    b = raid_fast.kmeans(x, 6, seed=1)
    c = raid_fast.kmeans(x, 6, seed=2)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.obj, b.obj)
    assert not torch.equal(a.centroids, c.centroids)
    r1 = raid_fast.kmeans(x, 6, seed=1, init="random")
    r2 = raid_fast.kmeans(x, 6, seed=1, init="random")
    assert torch.equal(r1.centroids, r2.centroids)


def test_batched_equals_separate_problems():
    x = blobs(3, 200, 6, centers=4, seed=7)
    batched = raid_fast.kmeans(x, 4, niter=6, init_centroids=x[:, :4])
    for g in range(3):
        single = raid_fast.kmeans(x[g], 4, niter=6, init_centroids=x[g, :4])
        assert torch.allclose(batched.centroids[g], single.centroids, atol=1e-6)
        assert torch.allclose(batched.obj[:, g], single.obj)
        assert torch.equal(batched.labels[g], single.labels)


def test_ragged_groups_with_empty_and_small_group():
    x = torch.randn(3 + 40, 5)
    offsets = torch.tensor([0, 3, 3, 43])
    res = raid_fast.kmeans(x, 4, niter=4, offsets=offsets)
    assert res.centroids.shape == (3, 4, 5)
    assert res.n_centroids.tolist() == [3, 0, 4]
    assert res.obj.shape == (5, 3)
    assert float(res.obj[-1, 0]) == 0.0 and float(res.obj[-1, 1]) == 0.0  # 3 points, 3 centroids
    assert torch.equal(res.centroids[0, 3], torch.zeros(5)) and torch.equal(res.centroids[1], torch.zeros(4, 5))
    assert res.counts.sum(1).tolist() == [3, 0, 40]
    assert int(res.labels[:3].max()) <= 2


def test_public_assign_non_contiguous_and_numpy():
    base = torch.randn(6, 200)
    x = base.T  # [200, 6] non-contiguous
    c = torch.randn(5, 6)
    dist, idx = raid_fast.ops.kmeans_assign(x, c)
    ref_dist, ref_idx = kmeans_assign_ref(x.contiguous(), torch.tensor([0, 200]), c.unsqueeze(0))
    assert torch.allclose(dist, ref_dist, atol=1e-4) and torch.equal(idx, ref_idx)
    dist_np, idx_np = raid_fast.ops.kmeans_assign(x.contiguous().numpy(), c.numpy())
    assert torch.equal(idx_np, idx)


def test_kmeans_class_api():
    x = blobs(1, 300, 8, centers=3, seed=1)[0]
    km = raid_fast.KMeans(3, niter=10, seed=0)
    assert "not fitted" in repr(km)
    with pytest.raises(RuntimeError, match="fit"):
        km.assign(x)
    assert km.fit(x) is km
    assert km.centroids.shape == (3, 8) and km.obj.shape == (11,)
    dist, idx = km.assign(x)
    assert torch.equal(idx, km.labels)
    assert abs(float(dist.double().sum()) - float(km.obj[-1])) <= 1e-4 * float(km.obj[-1])
    # a progress bar does not change the result
    km2 = raid_fast.KMeans(3, niter=10, seed=0, progress=True).fit(x)
    assert torch.equal(km2.centroids, km.centroids)


class TestErrors:
    def test_k_too_large(self):
        with pytest.raises(ValueError, match=r"k must be <= the number of points per problem \(5\), got k=6"):
            raid_fast.kmeans(torch.randn(5, 3), 6)

    @pytest.mark.parametrize("k", [0, -3])
    def test_k_below_one(self, k):
        with pytest.raises(ValueError, match=f"k must be >= 1, got {k}"):
            raid_fast.KMeans(k)

    def test_k_not_int(self):
        with pytest.raises(TypeError, match="k must be an int, got float"):
            raid_fast.kmeans(torch.randn(5, 3), 2.0)

    def test_no_points(self):
        with pytest.raises(ValueError, match="x must hold at least one point"):
            raid_fast.kmeans(torch.randn(0, 3), 1)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite(self, bad):
        x = torch.randn(10, 3)
        x[4, 1] = bad
        with pytest.raises(ValueError, match="x must be finite, got 1 NaN/inf"):
            raid_fast.kmeans(x, 2)

    def test_large_finite_values_are_not_flagged(self):
        # the fast finiteness test sums the input; an overflowing sum of finite values must pass
        x = torch.full((20, 2), 3e38)
        x[::2] *= -1
        x[1] = 3e38
        _, idx = raid_fast.ops.kmeans_assign(x, torch.tensor([[3e38, 3e38], [-3e38, -3e38]]), backend="torch")
        assert idx.tolist()[:2] == [1, 0]

    def test_non_finite_init(self):
        init = torch.randn(2, 3)
        init[0, 0] = float("nan")
        with pytest.raises(ValueError, match="init_centroids must be finite"):
            raid_fast.kmeans(torch.randn(10, 3), 2, init_centroids=init)

    def test_wrong_dtype(self):
        with pytest.raises(TypeError, match="x must be a floating-point tensor.*torch.int64"):
            raid_fast.kmeans(torch.arange(30).view(10, 3), 2)

    def test_wrong_type(self):
        with pytest.raises(TypeError, match="x must be a torch.Tensor or numpy.ndarray, got list"):
            raid_fast.kmeans([[1.0, 2.0]], 1)

    @pytest.mark.parametrize("shape", [(10,), (2, 3, 4, 5)])
    def test_wrong_ndim(self, shape):
        with pytest.raises(ValueError, match=r"x must be \[N, D\] or batched \[G, N, D\], got a"):
            raid_fast.kmeans(torch.randn(shape), 1)

    def test_ragged_needs_2d(self):
        with pytest.raises(ValueError, match=r"x must be \[N, D\] when offsets are given"):
            raid_fast.kmeans(torch.randn(2, 5, 3), 1, offsets=torch.tensor([0, 5, 10]))

    @pytest.mark.parametrize(
        "offsets,match",
        [
            ([1, 10], "must start at 0 and end at the number of values 10"),
            ([0, 6, 4, 10], "must be non-decreasing"),
            ([0.0, 10.0], "must have dtype torch.int64 or torch.int32"),
        ],
    )
    def test_bad_offsets(self, offsets, match):
        with pytest.raises((ValueError, TypeError), match=match):
            raid_fast.kmeans(torch.randn(10, 3), 1, offsets=torch.tensor(offsets))

    def test_init_wrong_shape(self):
        with pytest.raises(ValueError, match=r"init_centroids must have shape \[4, 3\] with k >= 1, got \(4, 2\)"):
            raid_fast.kmeans(torch.randn(10, 3), 4, init_centroids=torch.randn(4, 2))
        with pytest.raises(ValueError, match=r"init_centroids must have shape \[2, 4, 3\]"):
            raid_fast.kmeans(torch.randn(2, 10, 3), 4, init_centroids=torch.randn(3, 4, 3))

    def test_mixed_devices(self):
        with pytest.raises(ValueError, match="all tensors must be on one device, got x on cpu, init_centroids on meta"):
            raid_fast.kmeans(torch.randn(10, 3), 2, init_centroids=torch.empty(2, 3, device="meta"))

    def test_bad_init_name(self):
        with pytest.raises(ValueError, match="init must be one of"):
            raid_fast.KMeans(3, init="kmeans||")

    def test_unknown_backend(self):
        with pytest.raises(RuntimeError, match="'fast' is not a registered backend; registered: .*'torch'"):
            raid_fast.kmeans(torch.randn(10, 3), 2, backend="fast")

    def test_cuda_backend_on_cpu_tensor(self):
        with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve this call"):
            raid_fast.kmeans(torch.randn(10, 3), 2, backend="cuda")

    def test_cuda_tensor_without_cuda_build(self, monkeypatch):
        from raid_fast import _ext

        monkeypatch.setattr(_ext, "EXT_HAS_CUDA", False)
        monkeypatch.setattr(_ext, "_C", object())
        assert "built without CUDA" in _ext.ext_cuda_unavailable_reason()
