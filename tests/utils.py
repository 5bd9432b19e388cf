"""Shared test helpers: backend parametrisation, tie-aware comparisons and strided views."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import raid_fast


def backend_params(op: str) -> list:
    """pytest params for every backend of ``op``; unavailable ones skip with their reason, the
    CUDA one is marked ``cuda`` (skipped without a GPU), the triton one ``triton`` (so that a GPU
    run's ``-m "cuda or triton"`` selects it)."""
    params = []
    for name, status in raid_fast.backends()[op].items():
        marks = []
        if name == "cuda":
            marks.append(pytest.mark.cuda)
        if name == "triton":
            marks.append(pytest.mark.triton)
        if not status.startswith("ok"):
            marks.append(pytest.mark.skip(reason=f"{name}: {status}"))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def fast_backend_params(op: str, expected: tuple[str, ...] = ("cpp", "triton")) -> list:
    """``backend_params(op)`` without the torch reference (what the others are checked against), the
    triton ones marked ``triton``; a backend in ``expected`` that ``op`` lacks (triton not installed,
    so nothing registered it) skips too, rather than vanishing from the report."""
    params = []
    for param in backend_params(op):
        (name,) = param.values
        if name == "torch":
            continue
        params.append(pytest.param(name, id=name, marks=list(param.marks)))
    registered = {param.id for param in params}
    for name in expected:
        if name not in registered:
            reason = f"{name}: no {name} backend is registered for {op}"
            marks = [pytest.mark.skip(reason=reason)] + ([pytest.mark.triton] if name == "triton" else [])
            params.append(pytest.param(name, id=name, marks=marks))
    return params


def triton_interpreted() -> bool:
    """Whether triton kernels run under the interpreter (tests/conftest.py sets it without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_sort_networks() -> list[str]:
    """The sort networks triton tests run with: compiled, tl.topk / tl.bitonic_merge ("native") and the
    min/max one ("network"); interpreted only the network (tl.sort's xor_sum runs element by element there)."""
    return ["network"] if triton_interpreted() else ["native", "network"]


def device_of(backend: str) -> str:
    # compiled triton kernels take CUDA tensors; interpreted ones take CPU tensors
    if backend == "cuda" or (backend == "triton" and not triton_interpreted()):
        return "cuda"
    return "cpu"


def assert_close_verbose(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """allclose with a message that shows the worst element and NaN/inf mismatches."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN at {torch.nonzero(nan_a ^ nan_e)[:5].tolist()}"
    ok = torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok)
        first = tuple(bad[0].tolist())
        err = (actual - expected).abs().nan_to_num(0).max().item()
        msg = (
            f"{name}: {bad.shape[0]} of {actual.numel()} elements differ (max abs err {err:.3e}); "
            f"first at {first}: {actual[first].item()} vs {expected[first].item()}"
        )
        raise AssertionError(msg)


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as x [R, C] in a non-contiguous view with strides (2 * C, 2)."""
    big = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    big[:, ::2] = x
    return big[:, ::2]


def assert_topk_matches(dist, idx, ref_dist, ref_idx, queries, tokens, admissible, atol: float = 1e-5) -> None:
    """Tie-aware comparison of a top-K search with its reference (faiss's check_ref_knn_with_draws,
    with a tolerance).

    Distances allclose; missing slots (-1 / +inf) where the reference has them; ascending rows; every
    index admissible ([M, N] bool), unique in its row and carrying its own distance; the same index
    sets below the last (cut) group of equal distances. ``atol`` covers float32 sums in another order.
    """
    m, k = ref_idx.shape
    assert dist.shape == (m, k) and idx.shape == (m, k), (tuple(dist.shape), tuple(idx.shape), (m, k))
    assert dist.dtype == torch.float32 and idx.dtype == torch.int64
    assert dist.device == queries.device and idx.device == queries.device
    assert_close_verbose("dist", dist, ref_dist, atol=atol, rtol=0)
    dist, idx, ref_idx = dist.cpu(), idx.cpu(), ref_idx.cpu()
    assert torch.equal(idx < 0, ref_idx < 0), "missing slots differ from the reference"
    assert torch.equal(torch.isinf(dist), idx < 0), "+inf exactly where idx is -1"
    if k > 1:
        assert bool((dist[:, 1:] >= dist[:, :-1]).all()), "rows must be sorted ascending"
    n = tokens.shape[0]
    assert bool(((idx >= -1) & (idx < n)).all()), "indices must be -1 or valid token ids"
    q64, t64, ok = queries.cpu().double(), tokens.cpu().double(), admissible.cpu()
    for row in range(m):
        got = idx[row][idx[row] >= 0]
        want = ref_idx[row][ref_idx[row] >= 0]
        assert got.unique().numel() == got.numel(), f"row {row}: repeated index"
        assert bool(ok[row, got].all()), f"row {row}: inadmissible index {got[~ok[row, got]].tolist()}"
        exact = 1.0 - t64[got] @ q64[row]
        assert torch.allclose(exact, dist[row, : got.numel()].double(), atol=atol), f"row {row}: idx/dist mismatch"
        # the group cut by K may hold any of its members: compare the sets strictly below it
        cut = (1.0 - t64[want] @ q64[row]).max() if want.numel() == k else float("inf")
        exact_want = 1.0 - t64[want] @ q64[row]
        below_got = set(got[exact < cut - atol].tolist())
        below_want = set(want[exact_want < cut - atol].tolist())
        assert below_got == below_want, f"row {row}: {sorted(below_got ^ below_want)[:8]} differ (not a tie)"


def assert_assign_equal_up_to_ties(
    x: torch.Tensor,
    centroids: torch.Tensor,
    offsets: torch.Tensor,
    idx: torch.Tensor,
    ref_idx: torch.Tensor,
    rtol: float = 1e-4,
    norm_rtol: float = 0.0,
) -> None:
    """Assignments must be equal except where the two centroids are equally near: within rtol of the
    distance, plus ``norm_rtol`` of ||x||^2 + ||c||^2, the rounding error of a distance computed as
    ||x||^2 + ||c||^2 - 2 x.c in float32 (a near-duplicate centroid can sit below it)."""
    idx, ref_idx = idx.cpu(), ref_idx.cpu()
    assert idx.shape == ref_idx.shape
    diff = torch.nonzero(idx != ref_idx).flatten()
    if diff.numel() == 0:
        return
    x, centroids, off = x.cpu().double(), centroids.cpu().double(), offsets.cpu()
    group = torch.searchsorted(off, diff, right=True) - 1
    for i, g in zip(diff.tolist(), group.tolist()):
        a = (x[i] - centroids[g, idx[i]]).square().sum()
        b = (x[i] - centroids[g, ref_idx[i]]).square().sum()
        scale = max(float(b), 1e-12)
        norms = float(x[i].square().sum() + centroids[g, ref_idx[i]].square().sum())
        assert abs(float(a - b)) <= rtol * scale + norm_rtol * norms + 1e-6, (
            f"point {i}: idx {int(idx[i])} (d2={float(a):.6g}) vs ref {int(ref_idx[i])} (d2={float(b):.6g}) is not a tie"
        )


def blobs(n_groups: int, n: int, d: int, centers: int, seed: int = 0, spread: float = 0.05) -> torch.Tensor:
    """[G, n, D] float32 points around well-separated random centers (few near-ties)."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(n_groups, centers, d, generator=gen)  # [G, C, D]
    which = torch.randint(0, centers, (n_groups, n), generator=gen)  # [G, n]
    pts = torch.gather(c, 1, which.unsqueeze(-1).expand(-1, -1, d))
    return (pts + spread * torch.randn(n_groups, n, d, generator=gen)).float()


def unit(*shape: int, device="cpu") -> torch.Tensor:
    """Random unit-norm rows."""
    return F.normalize(torch.randn(*shape, device=device), dim=-1)


def tie_vectors(n: int, d: int, device="cpu", seed: int = 0) -> torch.Tensor:
    """[n, D] unit rows (D >= 16) of +-1/4 on 16 random coordinates: every dot is a multiple of 1/16,
    exact in float32 and float16 whatever the summation order, so equal distances are exact ties on
    every backend (and many of them: a dot takes one of at most 33 values)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, d)
    coords = torch.argsort(torch.rand(n, d, generator=gen), dim=1)[:, :16]  # [n, 16] distinct per row
    signs = torch.randint(0, 2, (n, 16), generator=gen).float() * 0.5 - 0.25
    return x.scatter_(1, coords, signs).to(device)


def assert_same_topk(dist, idx, ref_dist, ref_idx) -> None:
    """Bitwise the reference's answer, tie order included (for inputs whose distances are exact)."""
    dist, idx = dist.cpu(), idx.cpu()
    assert torch.equal(dist, ref_dist.cpu()), f"distances differ: {torch.nonzero(dist != ref_dist.cpu())[:5].tolist()}"
    diff = torch.nonzero(idx != ref_idx.cpu())
    if diff.numel():
        r, c = diff[0].tolist()
        msg = (
            f"{diff.shape[0]} ids differ from the reference's tie order, first at row {r} slot {c}: "
            f"{idx[r].tolist()} vs {ref_idx[r].tolist()}"
        )
        raise AssertionError(msg)


def cosine_admissible(m, n, lo=None, hi=None, token_group=None, exclude_group=None, device="cpu") -> torch.Tensor:
    """[M, N] bool: which tokens each query of a flat search may see (ranges, exclusion groups)."""
    ids = torch.arange(n, device=device)
    ok = torch.ones(m, n, dtype=torch.bool, device=device)
    if lo is not None:
        ok &= (ids[None, :] >= lo[:, None]) & (ids[None, :] < hi[:, None])
    if exclude_group is not None:
        ok &= token_group[None, :] != exclude_group[:, None]
    return ok


def make_lists(sizes, d, device="cpu"):
    """CSR offsets [L + 1] and unit tokens [N, D] for lists of the given sizes."""
    sizes = torch.tensor(sizes, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).to(device)
    return offsets, unit(int(sizes.sum()), d, device=device)


def random_probes(m, n_lists, p, device="cpu"):
    """[M, P] distinct random list ids per row."""
    return torch.stack([torch.randperm(n_lists)[:p] for _ in range(m)]).to(device)


def ivf_admissible(probes, offsets, n, token_group=None, exclude_group=None):
    """[M, N] bool: which tokens lie in each query's probed lists (and are not excluded)."""
    owner = torch.searchsorted(offsets, torch.arange(n, device=offsets.device), right=True) - 1  # [N]
    ok = (owner[None, None, :] == probes[:, :, None]).any(dim=1)  # [M, N]
    if exclude_group is not None:
        ok &= token_group[None, :] != exclude_group[:, None]
    return ok


def check_cosine(backend, queries, tokens, k, lo=None, hi=None, token_group=None, exclude_group=None, run=None):
    """Flat top-K of ``backend`` (or of ``run``, a launcher) checked against the reference."""
    from raid_fast import _dispatch
    from raid_fast.ref.similarity import cosine_topk_ref

    args = (queries, tokens, k, lo, hi, token_group, exclude_group)
    dist, idx = run(*args) if run is not None else _dispatch.call("cosine_topk", *args, backend=backend)
    ref_dist, ref_idx = cosine_topk_ref(*args)
    ok = cosine_admissible(queries.shape[0], tokens.shape[0], lo, hi, token_group, exclude_group, device=queries.device)
    assert_topk_matches(dist, idx, ref_dist, ref_idx, queries, tokens, ok)
    return dist, idx


def check_ivf(backend, queries, probes, offsets, tokens, k, token_group=None, exclude_group=None):
    """IVF top-K of ``backend`` checked against the reference."""
    from raid_fast import _dispatch
    from raid_fast.ref.ivf_search import ivf_topk_ref

    args = (queries, probes, offsets, tokens, k, token_group, exclude_group)
    dist, idx = _dispatch.call("ivf_topk", *args, backend=backend)
    ref_dist, ref_idx = ivf_topk_ref(*args)
    ok = ivf_admissible(probes, offsets, tokens.shape[0], token_group, exclude_group)
    assert_topk_matches(dist, idx, ref_dist, ref_idx, queries, tokens, ok)
    return dist, idx


def tiny_embedded_dataset(tmp_path_factory, **sizes):
    """The embedded dataset at 64 px with few images per split (``n_train``, ``n_test_good``,
    ``n_test_bad``); skips without scikit-image (its textures) or timm (the backbone)."""
    pytest.importorskip("skimage")
    pytest.importorskip("timm")
    from raid_fast.data import make_embedded_dataset

    return make_embedded_dataset(tmp_path_factory.mktemp("data") / "embedded", image_size=64, **sizes)


def brute_force(q: torch.Tensor, x: torch.Tensor, metric: str) -> torch.Tensor:
    """[M, N] float64 distances (ascending is better; ip is negated)."""
    q, x = q.double(), x.double()
    if metric == "l2":
        return (q[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    if metric == "ip":
        return -(q @ x.T)
    return 1.0 - F.normalize(q, dim=1) @ F.normalize(x, dim=1).T


def assert_knn(dist, idx, q, x, metric, k, atol=1e-4):
    """dist/idx equal the exact answer: sorted, ties by smaller id, the K-th group cut anywhere."""
    full = brute_force(q.cpu(), x.cpu(), metric)  # [M, N]
    sign = -1.0 if metric == "ip" else 1.0
    dist, idx = dist.cpu(), idx.cpu()
    n = x.shape[0]
    for row in range(q.shape[0]):
        got = idx[row]
        valid = got >= 0
        assert int(valid.sum()) == min(k, n), f"row {row}: {int(valid.sum())} neighbours, expected {min(k, n)}"
        assert bool((~valid).logical_or(valid).all())
        g = got[valid]
        assert g.unique().numel() == g.numel(), f"row {row}: repeated id"
        exact = full[row, g]
        torch.testing.assert_close(dist[row, valid].double(), sign * exact, atol=atol, rtol=1e-5)
        # ascending (descending for ip), and exact ties in ascending id order
        assert bool((exact[1:] >= exact[:-1] - atol).all()), f"row {row}: not sorted"
        tie = (exact[1:] - exact[:-1]).abs() == 0
        assert bool((g[1:][tie] > g[:-1][tie]).all()), f"row {row}: ties not by ascending id"
        # the set strictly better than the K-th distance is the exact one
        cut = exact.max()
        want = set(torch.nonzero(full[row] < cut - atol).flatten().tolist())
        assert want <= set(g.tolist()), f"row {row}: missed {sorted(want - set(g.tolist()))[:8]}"
        missing = dist[row, ~valid]
        assert bool(torch.isinf(missing).all()) and bool(((missing < 0) == (metric == "ip")).all())
