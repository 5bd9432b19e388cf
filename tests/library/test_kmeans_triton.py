"""Half-precision KMeans (``precision="fp16" | "bf16"``): the triton Lloyd kernels against the torch
reference run on the rounded points, the emulation on float32 backends, and the errors."""

import pytest
import torch

import raid_fast
from raid_fast import _dispatch
from raid_fast._ragged import Groups
from raid_fast.ref.kmeans import kmeans_assign_ref, kmeans_update_ref
from tests.utils import assert_assign_equal_up_to_ties, assert_close_verbose, blobs, device_of

LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}
# float32 dots over D <= 300: the GEMM-form distance is exact to about this fraction of the norms
NORM_RTOL = 1e-5


def triton_param():
    status = raid_fast.backends()["kmeans_step"].get("triton", "triton is not registered (not importable)")
    marks = [pytest.mark.triton]
    if not status.startswith("ok"):
        marks.append(pytest.mark.skip(reason=f"triton: {status}"))
    return pytest.param("triton", id="triton", marks=marks)


TRITON = [triton_param()]

# (group sizes, D, k): one tile, several tiles and programs per group, ragged with an empty group and
# N_g < k, D not a multiple of the dim chunk, k above 64 (64-point tiles), and D wide enough at k=100
# for several dim windows (each program then holds a third of D)
SHAPES = [
    ((1,), 3, 1),
    ((300,), 60, 7),
    ((5, 0, 140, 3), 17, 6),
    ((260, 90), 200, 50),
    ((150,), 24, 100),
    ((130,), 300, 100),
]
SHAPE_IDS = [f"N{'-'.join(map(str, s))}-D{d}-k{k}" for s, d, k in SHAPES]


def rounded_problem(sizes, d, k, precision, device, seed=0):
    """(x_low [N, D], x_rounded float32 [N, D], groups, centroids [G, k, D] on data points, some
    duplicated so that clusters empty and split)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), d, generator=gen)
    x_low = x.to(LOW[precision])
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    groups = Groups.from_offsets(offsets, x.shape[0], torch.device(device))
    c = torch.zeros(len(sizes), k, d)
    for g, (lo, n) in enumerate(zip(offsets[:-1].tolist(), sizes)):
        k_g = min(k, n)
        c[g, :k_g] = x[lo + torch.arange(k_g) // 2] + 0.01 * torch.randn(k_g, d, generator=gen)
    return x_low.to(device), x_low.float(), groups, c.to(device)


def reference_assign(x_rounded, groups, c, precision):
    c_rounded = c.cpu().to(LOW[precision]).float()
    return kmeans_assign_ref(x_rounded, groups.offsets_cpu, c_rounded), c_rounded


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("sizes,d,k", SHAPES, ids=SHAPE_IDS)
def test_assign_matches_reference_on_rounded_values(backend, precision, sizes, d, k):
    x_low, x32, groups, c = rounded_problem(sizes, d, k, precision, device_of(backend))
    dist, idx = _dispatch.call("kmeans_assign", x_low, groups.offsets, groups.max_size, c, backend=backend)
    (ref_dist, ref_idx), c_rounded = reference_assign(x32, groups, c, precision)
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    # fp32 accumulation of exact half products: only the summation order differs from float64
    assert_close_verbose("dist", dist, ref_dist, atol=1e-3, rtol=1e-4)
    assert_assign_equal_up_to_ties(x32, c_rounded, groups.offsets_cpu, idx, ref_idx, norm_rtol=NORM_RTOL)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("spherical", [False, True], ids=["l2", "spherical"])
@pytest.mark.parametrize("sizes,d,k", SHAPES, ids=SHAPE_IDS)
def test_step_matches_reference_on_rounded_values(backend, precision, spherical, sizes, d, k):
    x_low, x32, groups, c = rounded_problem(sizes, d, k, precision, device_of(backend))
    dist, idx, new_c, counts = _dispatch.call(
        "kmeans_step", x_low, groups.offsets, groups.max_size, c, spherical, backend=backend
    )
    (ref_dist, ref_idx), c_rounded = reference_assign(x32, groups, c, precision)
    assert_close_verbose("dist", dist, ref_dist, atol=1e-3, rtol=1e-4)
    assert_assign_equal_up_to_ties(x32, c_rounded, groups.offsets_cpu, idx, ref_idx, norm_rtol=NORM_RTOL)
    # the update from the kernel's own assignment: means of the rounded points, the split rule
    ref_c, ref_counts = kmeans_update_ref(x32, groups.offsets_cpu, idx.cpu(), c.shape[1], spherical)
    assert torch.equal(counts.cpu(), ref_counts)
    assert_close_verbose("centroids", new_c, ref_c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", TRITON)
def test_empty_clusters_split_from_the_largest(backend):
    dev = device_of(backend)
    x = torch.randn(200, 16)
    x_low = x.half()
    groups = Groups.uniform(1, 200, torch.device(dev))
    # three centroids no point is near: all empty, each splits the then-largest cluster
    c = torch.cat([x[:4], torch.full((3, 16), 50.0)]).unsqueeze(0)  # [1, 7, 16]
    _, idx, new_c, counts = _dispatch.call(
        "kmeans_step", x_low.to(dev), groups.offsets, groups.max_size, c.to(dev), False, backend=backend
    )
    assert counts.cpu()[0, 4:].tolist() == [0, 0, 0]
    ref_c, _ = kmeans_update_ref(x_low.float(), groups.offsets_cpu, idx.cpu(), 7, False)
    assert_close_verbose("centroids", new_c, ref_c, atol=1e-5, rtol=1e-5)
    assert bool((new_c.cpu()[0, 4:].abs().sum(1) > 0).all())


@pytest.mark.parametrize("backend", TRITON)
def test_assign_ties_pick_smallest_index(backend):
    dev = device_of(backend)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=torch.float16, device=dev)
    c = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]], device=dev)
    _, idx = _dispatch.call("kmeans_assign", x, torch.tensor([0, 3], device=x.device), 3, c, backend=backend)
    assert idx.cpu().tolist() == [0, 1, 0]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("spherical", [False, True], ids=["l2", "spherical"])
def test_fit_matches_reference_with_same_init(backend, precision, spherical):
    dev = device_of(backend)
    x = blobs(3, 400, 24, centers=6, seed=2)  # [G, n, D]
    if spherical:
        x = torch.nn.functional.normalize(x, dim=-1)
    init = x[:, :6].clone()
    fast = raid_fast.kmeans(
        x.to(dev), 6, niter=6, init_centroids=init.to(dev), spherical=spherical, precision=precision, backend=backend
    )
    ref = raid_fast.kmeans(
        x, 6, niter=6, init_centroids=init, spherical=spherical, precision=precision, backend="torch"
    )
    assert torch.equal(fast.labels.cpu(), ref.labels)
    assert torch.equal(fast.counts.cpu(), ref.counts)
    assert_close_verbose("centroids", fast.centroids, ref.centroids, atol=1e-4, rtol=1e-4)
    assert_close_verbose("obj", fast.obj, ref.obj, atol=1e-3, rtol=1e-5)
    # and close to full precision: the rounding moves the inertia by far less than 0.1%
    full = raid_fast.kmeans(x, 6, niter=6, init_centroids=init, spherical=spherical, backend="torch")
    assert abs(float(fast.obj[-1].sum() - full.obj[-1].sum())) <= 1e-3 * float(full.obj[-1].sum())


@pytest.mark.parametrize("backend", TRITON)
def test_fit_ragged_with_empty_and_small_group(backend):
    dev = device_of(backend)
    x = torch.randn(3 + 40, 5)
    offsets = torch.tensor([0, 3, 3, 43])
    fast = raid_fast.kmeans(x.to(dev), 4, niter=3, offsets=offsets, precision="fp16", backend=backend)
    ref = raid_fast.kmeans(x, 4, niter=3, offsets=offsets, precision="fp16", backend="torch")
    assert torch.equal(fast.labels.cpu(), ref.labels)
    assert_close_verbose("centroids", fast.centroids, ref.centroids, atol=1e-5, rtol=1e-5)
    assert fast.n_centroids.tolist() == [3, 0, 4]
    assert torch.equal(fast.centroids.cpu()[1], torch.zeros(4, 5))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_float32_backends_compute_on_the_rounded_values(backend):
    if backend == "cpp" and not raid_fast.backends()["kmeans_step"]["cpp"].startswith("ok"):
        pytest.skip(raid_fast.backends()["kmeans_step"]["cpp"])
    x = blobs(2, 300, 12, centers=5, seed=3)
    init = x[:, :5].clone()
    low = raid_fast.kmeans(x, 5, niter=4, init_centroids=init, precision="fp16", backend=backend)
    by_hand = raid_fast.kmeans(x.half().float(), 5, niter=1, init_centroids=init.half().float(), backend="torch")
    # the first iteration is plain k-means on the rounded points and centroids
    assert_close_verbose("obj[0]", low.obj[0], by_hand.obj[0], atol=1e-4, rtol=1e-6)
    ref = raid_fast.kmeans(x, 5, niter=4, init_centroids=init, precision="fp16", backend="torch")
    assert torch.equal(low.labels, ref.labels)
    assert_close_verbose("centroids", low.centroids, ref.centroids, atol=1e-5, rtol=1e-5)


def test_auto_backend_without_triton_device_uses_the_rounded_values():
    # on the CPU auto never picks interpreted triton: a float32 backend runs the same computation
    x = blobs(1, 200, 8, centers=3, seed=5)[0]
    auto = raid_fast.kmeans(x, 3, niter=3, seed=0, precision="bf16")
    ref = raid_fast.kmeans(x, 3, niter=3, seed=0, precision="bf16", backend="torch")
    assert torch.equal(auto.labels, ref.labels)
    assert_close_verbose("centroids", auto.centroids, ref.centroids, atol=1e-5, rtol=1e-5)
    km = raid_fast.KMeans(3, niter=3, precision="bf16").fit(x)
    assert "precision='bf16'" in repr(km)
    assert torch.equal(km.labels, ref.labels)


class TestErrors:
    def test_unknown_precision(self):
        with pytest.raises(ValueError, match="precision must be one of"):
            raid_fast.kmeans(torch.randn(10, 3), 2, precision="fp8")

    def test_fp16_overflow_is_refused(self):
        x = torch.randn(10, 3)
        x[2, 1] = 1e5
        with pytest.raises(ValueError, match=r"outside the fp16 range \(max \|x\| = 1e\+05\)"):
            raid_fast.kmeans(x, 2, precision="fp16")
        # bf16 has float32's range, but squared distances accumulate in float32
        raid_fast.kmeans(x, 2, niter=1, precision="bf16")
        x[2, 1] = 1e19
        with pytest.raises(ValueError, match=r"too large for precision='bf16': squared distances would overflow"):
            raid_fast.kmeans(x, 2, precision="bf16")

    @pytest.mark.parametrize("backend", TRITON)
    def test_triton_needs_half_precision(self, backend):
        with pytest.raises(RuntimeError, match=r"needs float16 or bfloat16 points \(raid_fast.kmeans\(precision="):
            raid_fast.kmeans(torch.randn(10, 3), 2, backend=backend)

    @pytest.mark.parametrize("backend", TRITON)
    def test_triton_k_limit(self, backend):
        with pytest.raises(RuntimeError, match="k=129 is above the triton maximum 128"):
            raid_fast.kmeans(torch.randn(200, 3), 129, niter=1, precision="fp16", backend=backend)

    @pytest.mark.parametrize("backend", TRITON)
    def test_triton_group_size_limit(self, backend, monkeypatch):
        from raid_fast.kernels import kmeans as kernels

        # offsets inside a group are int32: the limit, lowered here, counts the last tile's padding
        monkeypatch.setattr(kernels, "MAX_GROUP_ELEMENTS", (100 + kernels.MAX_TILE) * 8 - 1)
        with pytest.raises(RuntimeError, match=r"a group of 100 x 8 values is above the triton maximum"):
            raid_fast.kmeans(torch.randn(100, 8), 3, niter=1, precision="fp16", backend=backend)
        # and the other backends still serve the call, on the rounded values
        raid_fast.kmeans(torch.randn(100, 8), 3, niter=1, precision="fp16")
