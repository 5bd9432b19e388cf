"""The bfloat16 candidate filter of the CPU flat search (``raid_fast.bf16_filter``), switched on for
every size: ``knn`` and a flat ``Index`` through it equal float64 brute force (tie-aware) and the
float32 search, its error bound holds on adversarial data, and what it cannot narrow falls back."""

import pickle

import numpy as np
import pytest
import torch

import raid_fast as rf
from raid_fast import bf16_filter, neighbors
from tests.utils import assert_knn, brute_force


@pytest.fixture
def filter_on(monkeypatch):
    """The filter for every CPU search, counting its calls and the queries it hands back."""
    monkeypatch.setattr(bf16_filter, "MODE", "on")
    seen = {"calls": 0, "fallback_rows": 0}
    real = bf16_filter.candidates

    def spy(q, fb, k, fallback):
        seen["calls"] += 1

        def counted(rows):
            seen["fallback_rows"] += rows.numel()
            return fallback(rows)

        return real(q, fb, k, counted)

    monkeypatch.setattr(bf16_filter, "candidates", spy)
    return seen


def _data(m, n, d, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "relu":  # post-ReLU features: non-negative, a large common mean
        return torch.randn(m, d, generator=g).relu_(), torch.randn(n, d, generator=g).relu_()
    if kind == "offset":  # norms that dwarf the distances: the centring matters
        return 20.0 + torch.randn(m, d, generator=g), 20.0 + torch.randn(n, d, generator=g)
    if kind == "heavy":  # heavy tails: a few coordinates carry most of the norm
        return torch.randn(m, d, generator=g) ** 3, torch.randn(n, d, generator=g) ** 3
    return 1e-3 * torch.randn(m, d, generator=g), 1e-3 * torch.randn(n, d, generator=g)  # "tiny"


def float32_values(q, x, metric):
    """[M, N] what faiss and PatchCore compute in float32 (ascending is better; ip negated)."""
    if metric == "l2":
        return (q @ x.T).mul(-2).add_(q.pow(2).sum(-1, keepdim=True)).add_(x.pow(2).sum(-1)[None, :]).clamp_min_(0)
    if metric == "ip":
        return -(q @ x.T)
    return 1.0 - torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).T


@pytest.mark.parametrize("kind", ["relu", "offset", "heavy", "tiny"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_filter_equals_brute_force_and_the_float32_search(filter_on, kind, metric, k):
    q, x = _data(31, 613, 37, seed=k, kind=kind)
    scale = float(brute_force(q, x, metric).abs().max())
    # exact distances: the exact neighbours, even where float32's expansion cannot rank them ("offset")
    dist, idx = rf.knn(q, x, k, metric, exact_distances=True)
    # (cosine: float32 unit vectors, then float64)
    assert_knn(dist, idx, q, x, metric, k, atol=1e-6 * scale + (3e-7 if metric == "cosine" else 1e-12))
    # float32 distances: the K best of faiss's float32 values over the whole bank, to the few ulps by
    # which two matmul kernels differ (of the norms' scale for l2's expansion)
    dist, idx = rf.knn(q, x, k, metric)
    assert filter_on["calls"] == 2
    # nearly parallel unit vectors ("offset", cosine) leave a few queries with K = 40 too many candidates
    assert filter_on["fallback_rows"] == 0 or (kind == "offset" and filter_on["fallback_rows"] < 31 // 4)
    values = float32_values(q, x, metric)  # [M, N]
    best = values.topk(k, dim=1, largest=False).values
    ulps = 1e-6 * max(float(values.abs().max()), 1.0 if metric == "cosine" else 0.0)  # cosine: 1 - dot
    if metric == "l2":
        ulps = 1e-6 * float((q.norm(dim=1).max() + x.norm(dim=1).max()) ** 2)
    sign = -1.0 if metric == "ip" else 1.0
    torch.testing.assert_close(sign * dist, best, rtol=0, atol=ulps)
    torch.testing.assert_close(values.gather(1, idx), best, rtol=0, atol=ulps)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_filter_ties_and_differences_below_bfloat16(filter_on, metric):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(50, 24, generator=g).relu_() + 1.0
    # exact duplicates (ties go to the smaller id) and copies moved by 1e-4 of a coordinate, which
    # bfloat16 (3 significant digits) cannot tell apart but float32 can
    nudged = base[:20].clone()
    nudged[:, 3] *= 1.0 + 1e-4 * torch.arange(1, 21)
    x = torch.cat([base, base[:20], nudged, base[10:30]])  # [110, 24]
    q = torch.cat([base[:20], base[:20] * (1.0 + 3e-5), torch.randn(5, 24, generator=g).relu_() + 1.0])
    # float64 re-scoring of the candidates: the copies are ranked exactly, ties by id
    dist, idx = rf.knn(q, x, 5, metric, exact_distances=True)
    assert filter_on["calls"] == 1 and filter_on["fallback_rows"] == 0
    assert_knn(dist, idx, q, x, metric, 5, atol=3e-7 if metric == "cosine" else 1e-12)
    # float32 re-scoring: the K best float32 values (the copies tie there)
    dist, idx = rf.knn(q, x, 5, metric)
    best = float32_values(q, x, metric).topk(5, dim=1, largest=False).values
    torch.testing.assert_close((-1.0 if metric == "ip" else 1.0) * dist, best, rtol=0, atol=1e-5)


def test_filter_keeps_faiss_and_patchcores_float32_values(filter_on):
    faiss = pytest.importorskip("faiss")
    q, x = _data(60, 900, 48, seed=2, kind="relu")
    dist, idx = rf.knn(q, x, 9, "l2")
    index = faiss.IndexFlatL2(48)
    index.add(x.numpy())
    fd, fi = index.search(q.numpy(), 9)
    assert np.array_equal(idx.numpy(), fi)
    torch.testing.assert_close(dist, torch.from_numpy(fd), rtol=1e-5, atol=1e-4)
    full = (q @ x.T).mul(-2).add_(q.pow(2).sum(-1, keepdim=True)).add_(x.pow(2).sum(-1)[None, :]).clamp_min_(0)
    torch.testing.assert_close(dist, full.gather(1, idx), rtol=1e-6, atol=1e-5)
    assert filter_on["calls"] == 1


def test_filter_layouts_batches_numpy_and_missing(filter_on):
    q, x = _data(12, 40, 16, seed=3, kind="relu")
    qb = torch.stack([q, q.flip(0)])  # [2, 12, 16]
    dist, idx = rf.knn(qb.numpy(), x.numpy(), 3)
    for b in range(2):
        assert_knn(dist[b], idx[b], qb[b], x, "l2", 3)
    strided_q, strided_x = q.T.contiguous().T, torch.cat([x, x], 1)[:, ::2]  # non-contiguous views
    d2, i2 = rf.knn(strided_q, strided_x, 3)
    assert_knn(d2, i2, strided_q, strided_x, "l2", 3)
    d3, i3 = rf.knn(q, x[:5], 8)  # K > N: -1 and inf in the extra slots
    assert bool((i3[:, 5:] == -1).all()) and bool(torch.isinf(d3[:, 5:]).all())
    assert_knn(d3, i3, q, x[:5], "l2", 8)
    d4, i4 = rf.knn(q[:0], x, 2)
    assert d4.shape == i4.shape == (0, 2)
    assert filter_on["calls"] == 3  # no queries: nothing to filter


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_filter_in_a_flat_index_survives_add_and_pickle(filter_on, metric):
    q, x = _data(20, 300, 20, seed=4, kind="relu")
    index = rf.Index(x[:200], metric=metric)
    assert_knn(*index.search(q, 4), q, x[:200], metric, 4)
    index.add(x[200:])  # a new vectors tensor: the bfloat16 copy is rebuilt
    dist, idx = index.search(q, 4)
    assert_knn(dist, idx, q, x, metric, 4)
    copy = pickle.loads(pickle.dumps(index))
    assert [torch.equal(a, b) for a, b in zip(copy.search(q, 4), (dist, idx))] == [True, True]
    assert filter_on["calls"] == 3


def test_filter_hands_back_queries_it_cannot_narrow(filter_on):
    g = torch.Generator().manual_seed(6)
    same = torch.ones(600, 8) + 1e-3 * torch.arange(600)[:, None] / 600  # 600 rows bfloat16 cannot tell apart
    far = torch.randn(10, 8, generator=g) * 5
    x = torch.cat([same, far])
    q = torch.cat([torch.ones(3, 8), far[:4] + 0.01])  # 3 queries with 600 candidates, 4 with one
    dist, idx = rf.knn(q, x, 1)
    assert filter_on["fallback_rows"] == 3
    assert_knn(dist, idx, q, x, "l2", 1)
    assert torch.equal(idx[3:, 0], torch.arange(600, 604))


def test_filter_bound_holds_against_float64():
    """Every bfloat16 output is within the bound (plus its own rounding) of the exact score."""
    g = torch.Generator().manual_seed(7)
    d = 1536
    for tight, (q, x) in [
        (True, (torch.randn(64, d, generator=g).relu_(), torch.randn(2000, d, generator=g).relu_())),
        (True, (torch.randn(64, d, generator=g) ** 5, torch.randn(2000, d, generator=g) ** 5)),
        # norms that dwarf the scores: the re-scoring's float32 term rules, the bound is loose
        (False, (1e4 + torch.randn(64, d, generator=g), 1e4 + torch.randn(2000, d, generator=g))),
    ]:
        for metric in ("l2", "ip"):
            fb = bf16_filter.prepare_bank(x, metric)
            centred = q - fb.centre if metric == "l2" else q
            rounded = centred.to(torch.bfloat16)
            lhs = torch.cat([rounded, torch.ones(64, 2, dtype=rounded.dtype)], 1) if metric == "l2" else rounded
            out = (lhs @ fb.vectors.T).double()  # [M, N]
            xc = (x - fb.centre).double()
            exact = centred.double() @ xc.T  # the float32 queries' and centred vectors' true scores
            if metric == "l2":
                exact -= 0.5 * (xc * xc).sum(1)[None, :]
            bound = bf16_filter.error_bound(fb, q, centred, rounded)[:, None]
            slack = bound + 2.0**-8 / (1 - 2.0**-8) * out.abs()
            err = (out - exact).abs()
            assert bool((err <= slack).all()), f"{metric}: error {float((err / slack).max()):.3f} of the bound"
            assert not tight or float((err / slack).max()) > 0.02  # and the bound is not vacuous


def test_bf16_floor_is_the_largest_bfloat16_below():
    t = torch.cat([torch.randn(20000, dtype=torch.float64) * 100, torch.tensor([3.0, -3.0, 1e30, -1e-30])])
    f = bf16_filter._bf16_floor(t)
    assert f.dtype == torch.bfloat16 and bool((f.double() <= t).all())
    # at most two bfloat16 steps below t (float32's rounding may cost one): ulp = 2^(e - 8)
    _, exponent = torch.frexp(f.double())
    assert bool((f.double() + 2.0 * torch.pow(2.0, exponent.double() - 8) > t).all())
    special = bf16_filter._bf16_floor(torch.tensor([0.0, 1e-42, -1e-42, float("nan")], dtype=torch.float64))
    assert bool((special[:3].double() <= torch.tensor([0.0, 1e-42, -1e-42], dtype=torch.float64)).all())
    assert bool(torch.isnan(special[3]))


def test_auto_mode_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(bf16_filter, "MODE", None)
    monkeypatch.setattr(bf16_filter, "has_bf16_dot", lambda: True)
    assert bf16_filter.applies(784, 15753, 1536, 1, cpu, None)
    assert not bf16_filter.applies(784, 15753, 1536, 1, cpu, "cpp")  # a named backend serves it
    assert not bf16_filter.applies(784, 15753, 1536, 1, torch.device("meta"), None)
    assert not bf16_filter.applies(8192, 2457, 152, 1, cpu, None)  # D too small to gain
    assert not bf16_filter.applies(16, 1000, 1536, 1, cpu, None)  # too little work
    assert not bf16_filter.applies(784, 15753, 1536, 100, cpu, None)  # K beyond MAX_AUTO_K
    monkeypatch.setenv("RAID_FAST_BACKEND", "torch")
    assert not bf16_filter.applies(784, 15753, 1536, 1, cpu, None)
    monkeypatch.delenv("RAID_FAST_BACKEND")
    monkeypatch.setattr(bf16_filter, "has_bf16_dot", lambda: False)
    assert not bf16_filter.applies(784, 15753, 1536, 1, cpu, None)
    monkeypatch.setenv("RAID_FAST_CPU_FILTER", "on")
    assert bf16_filter.applies(1, 2, 3, 1, cpu, None)
    monkeypatch.setenv("RAID_FAST_CPU_FILTER", "off")
    assert not bf16_filter.applies(784, 15753, 1536, 1, cpu, None)
    monkeypatch.setenv("RAID_FAST_CPU_FILTER", "fast")
    with pytest.raises(ValueError, match="RAID_FAST_CPU_FILTER must be one of"):
        bf16_filter.applies(784, 15753, 1536, 1, cpu, None)


def test_a_bank_whose_norms_overflow_takes_the_float32_search(filter_on):
    x = torch.full((50, 4), 1e36)
    assert bf16_filter.prepare_bank(x, "l2") is None
    q = torch.full((3, 4), 1e36)
    rf.knn(q, x, 2, "ip")  # no error, no filter
    assert filter_on["calls"] == 0


def test_knn_caches_the_filter_bank_per_tensor_version(filter_on, monkeypatch):
    q, x = _data(8, 100, 6, seed=8, kind="relu")
    built = []
    real = bf16_filter.prepare_bank
    monkeypatch.setattr(bf16_filter, "prepare_bank", lambda v, metric: built.append(1) or real(v, metric))
    first = rf.knn(q, x, 3)
    rf.knn(q, x, 3)
    assert len(built) == 1
    x[first[1][0, 0]] += 100.0
    moved = rf.knn(q, x, 3)
    assert len(built) == 2 and int(moved[1][0, 0]) != int(first[1][0, 0])
    assert sum(entry[1][0] == "filter" for entry in neighbors._BANK_CACHE) <= neighbors._BANK_CACHE_SIZE
