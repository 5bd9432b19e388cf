"""``raid_fast.knn`` and ``raid_fast.Index`` against brute force in float64, torch.cdist and faiss-cpu
``IndexFlatL2`` / ``IndexFlatIP`` (tie-aware), on every backend of the flat search."""

import numpy as np
import pytest
import torch

import raid_fast as rf
from tests.utils import assert_knn, backend_params, brute_force, device_of

faiss = pytest.importorskip("faiss")


def _data(m=23, n=301, d=19, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g) * scale, torch.randn(n, d, generator=g) * scale


@pytest.mark.parametrize("backend", backend_params("cosine_topk"))
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_knn_equals_brute_force(backend, metric, k):
    q, x = _data()
    dev = device_of(backend)
    dist, idx = rf.knn(q.to(dev), x.to(dev), k, metric, backend=backend)
    assert dist.shape == idx.shape == (23, k) and dist.dtype == torch.float32 and idx.dtype == torch.int64
    assert_knn(dist, idx, q, x, metric, k)


@pytest.mark.parametrize("backend", backend_params("cosine_topk"))
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_knn_equals_faiss_flat_with_ties(backend, metric):
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-3, 4, (40, 8), generator=g).float()
    x = torch.cat([base, base[:15], base[5:10]])  # exact duplicates: tied distances
    q = torch.randint(-3, 4, (17, 8), generator=g).float()
    dev = device_of(backend)
    dist, idx = rf.knn(q.to(dev), x.to(dev), 9, metric, backend=backend)
    index = faiss.IndexFlatL2(8) if metric == "l2" else faiss.IndexFlatIP(8)
    index.add(x.numpy())
    fd, fi = index.search(q.numpy(), 9)
    torch.testing.assert_close(dist.cpu(), torch.from_numpy(fd), atol=1e-5, rtol=0)
    # integer data: distances are exact, so both must hold the same ids up to the order inside a tie
    for row in range(17):
        for value in torch.from_numpy(fd[row]).unique():
            if value == fd[row, -1]:
                continue  # the group cut by K may hold any of its members
            ours = set(idx[row][dist[row].cpu() == value].tolist())
            theirs = set(fi[row][fd[row] == value.item()].tolist())
            assert ours == theirs, (row, value.item())
    assert_knn(dist, idx, q, x, metric, 9, atol=0)


def test_knn_equals_torch_cdist():
    q, x = _data(m=40, n=500, d=33)
    dist, idx = rf.knn(q, x, 5, "l2", sqrt=True)
    ref = torch.cdist(q.double(), x.double())
    ref_dist, ref_idx = ref.topk(5, largest=False)
    torch.testing.assert_close(dist.double(), ref_dist, atol=1e-4, rtol=1e-6)
    assert torch.equal(idx, ref_idx)


def test_knn_batched_numpy_and_missing():
    q, x = _data(m=6, n=5, d=4)
    qb = torch.stack([q, 2 * q])  # [2, 6, 4]
    dist, idx = rf.knn(qb.numpy(), x.numpy(), 8, "l2")
    assert dist.shape == (2, 6, 8)
    assert bool((idx[..., 5:] == -1).all()) and bool(torch.isinf(dist[..., 5:]).all())
    for b in range(2):
        d1, i1 = rf.knn(qb[b], x, 8, "l2")
        assert torch.equal(i1, idx[b]) and torch.equal(d1, dist[b])
    dist, idx = rf.knn(q, x, 7, "ip")
    assert bool((dist[:, 5:] == float("-inf")).all()) and bool((dist[:, :-1] >= dist[:, 1:]).all())


def test_knn_large_norms_exact_distances():
    # PatchCore-like features: large norms, close neighbours; the augmented search only ranks, and
    # exact_distances recomputes the distances from the vectors
    g = torch.Generator().manual_seed(3)
    x = 50.0 + torch.randn(2000, 64, generator=g)
    q = x[:30] + 1e-3 * torch.randn(30, 64, generator=g)
    dist, idx = rf.knn(q, x, 1, "l2", exact_distances=True)
    assert torch.equal(idx[:, 0], torch.arange(30))
    exact = (q.double() - x[:30].double()).pow(2).sum(1)
    torch.testing.assert_close(dist[:, 0].double(), exact, rtol=1e-6, atol=0)
    # the default keeps faiss's float32 expansion, which cannot resolve these distances
    fast, fast_idx = rf.knn(q, x, 1, "l2")
    assert torch.equal(fast_idx, idx) and float((fast[:, 0].double() - exact).abs().max()) > 1e-3


def test_knn_distances_are_patchcores_arithmetic():
    """The default l2 distances equal anomalib PatchCore's euclidean_dist (squared) bit for bit:
    a float32 matmul, then -2 q.x + ||q||^2 + ||x||^2, clamped at 0."""
    g = torch.Generator().manual_seed(4)
    bank, q = 0.5 + 1.5 * torch.randn(3000, 152, generator=g), 0.5 + 1.5 * torch.randn(700, 152, generator=g)
    full = q.matmul(bank.T).mul(-2).add_(q.pow(2).sum(-1, keepdim=True)).add_(bank.pow(2).sum(-1)[None, :])
    full = full.clamp_min_(0)
    ref_dist, ref_idx = full.topk(9, dim=1, largest=False)
    dist, idx = rf.knn(q, bank, 9, "l2")
    assert torch.equal(idx, ref_idx)
    assert torch.equal(dist, ref_dist)
    ip, ip_idx = rf.knn(q, bank, 4, "ip")
    assert torch.equal(ip, (q @ bank.T).gather(1, ip_idx))


def test_knn_errors():
    q, x = _data(m=3, n=10, d=4)
    with pytest.raises(ValueError, match="metric must be one of"):
        rf.knn(q, x, 2, "manhattan")
    with pytest.raises(ValueError, match="bank must have D=4"):
        rf.knn(q, x[:, :3], 2)
    with pytest.raises(ValueError, match="sqrt=True applies to metric='l2' only"):
        rf.knn(q, x, 2, "ip", sqrt=True)
    with pytest.raises(ValueError, match="k must be >= 1"):
        rf.knn(q, x, 0)
    with pytest.raises(ValueError, match="queries must be finite"):
        rf.knn(q.masked_fill(q > 1, float("nan")), x, 2)
    with pytest.raises(TypeError, match="bank must be a floating-point tensor"):
        rf.knn(q, torch.ones(10, 4, dtype=torch.int64), 2)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_flat_index_equals_knn_and_adds(metric):
    q, x = _data()
    index = rf.Index(x[:200], metric=metric)
    index.add(x[200:])
    assert index.ntotal == len(index) == 301
    assert [torch.equal(a, b) for a, b in zip(index.search(q, 6), rf.knn(q, x, 6, metric))] == [True, True]


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_ivf_index_all_lists_is_exact_and_fewer_lists_recall(metric):
    q, x = _data(n=600)
    exact = rf.knn(q, x, 5, metric)
    full = rf.Index(x, metric=metric, n_lists=12, nprobe=12)
    assert [torch.equal(a, b) for a, b in zip(full.search(q, 5), exact)] == [True, True]
    some = rf.Index(x, metric=metric, n_lists=12, nprobe=3)
    dist, idx = some.search(q, 5)
    # what IVF finds is exact for those candidates: sorted, with their true distances
    assert_knn_candidates(dist, idx, q, x, metric)
    recall = (idx[:, :, None] == exact[1][:, None, :]).any(-1).float().mean()
    assert 0.1 < float(recall) <= 1.0
    # nprobe per call; more lists scanned never loses recall
    more = some.search(q, 5, nprobe=9)[1]
    assert float((more[:, :, None] == exact[1][:, None, :]).any(-1).float().mean()) >= float(recall)


def assert_knn_candidates(dist, idx, q, x, metric):
    full = brute_force(q, x, metric)
    sign = -1.0 if metric == "ip" else 1.0
    ok = idx >= 0
    torch.testing.assert_close(dist[ok].double(), sign * full.gather(1, idx.clamp_min(0))[ok], atol=1e-4, rtol=1e-5)


def test_ivf_add_keeps_ids_and_lists():
    q, x = _data(n=400)
    index = rf.Index(x[:300], metric="l2", n_lists=8, nprobe=8)
    index.add(x[300:])
    assert [torch.equal(a, b) for a, b in zip(index.search(q, 4), rf.knn(q, x, 4))] == [True, True]
    offsets = index.list_offsets
    assert int(offsets[-1]) == 400 and bool((offsets[1:] >= offsets[:-1]).all())
    assert torch.equal(index.list_ids.sort().values, torch.arange(400))


def test_index_state_dict_and_file_round_trip(tmp_path):
    q, x = _data(n=250)
    index = rf.Index(x, metric="cosine", n_lists=6, nprobe=2)
    want = index.search(q, 4)

    class Model(torch.nn.Module):
        def __init__(self, index):
            super().__init__()
            self.index = index

    torch.save(Model(index).state_dict(), tmp_path / "model.pt")
    fresh = Model(rf.Index(metric="cosine", n_lists=6, dim=x.shape[1]))
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert fresh.index.nprobe == 2 and fresh.index.ntotal == 250
    assert [torch.equal(a, b) for a, b in zip(fresh.index.search(q, 4), want)] == [True, True]
    with pytest.raises(ValueError, match="metric='cosine'"):
        Model(rf.Index(metric="l2", n_lists=6, dim=x.shape[1])).load_state_dict(Model(index).state_dict())

    index.save(tmp_path / "index.safetensors")
    loaded = rf.Index.load(tmp_path / "index.safetensors")
    assert [torch.equal(a, b) for a, b in zip(loaded.search(q, 4), want)] == [True, True]


def test_index_file_damage_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    index = rf.Index(_data(n=50)[1], metric="l2", n_lists=4)
    path = tmp_path / "index.safetensors"
    index.save(path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch"):
        rf.Index.load(tmp_path / "flipped.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(bytes(raw[:100]))
    with pytest.raises(ValueError, match="not a readable raid_fast index"):
        rf.Index.load(tmp_path / "cut.safetensors")
    # a crafted file with valid checksums but lists that do not cover the bank
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(path)
    tensors["list_offsets"] = tensors["list_offsets"].clone()
    tensors["list_offsets"][-1] -= 1
    import json

    from raid_fast.index import _sha256

    meta["sha256"] = json.dumps({k: _sha256(v) for k, v in tensors.items()})
    save_file(tensors, tmp_path / "crafted.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="list_offsets must be int64"):
        rf.Index.load(tmp_path / "crafted.safetensors")
    # a flat index whose list slots are not the bank ids (its search reads slots as ids)
    flat_path = tmp_path / "flat.safetensors"
    rf.Index(_data(n=50)[1], metric="l2").save(flat_path)
    with safe_open(flat_path, framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(flat_path)
    tensors["list_ids"] = tensors["list_ids"].flip(0).contiguous()
    meta["sha256"] = json.dumps({k: _sha256(v) for k, v in tensors.items()})
    save_file(tensors, tmp_path / "shuffled.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="list_ids of a flat index must be 0..N-1 in order"):
        rf.Index.load(tmp_path / "shuffled.safetensors")
    with pytest.raises(FileNotFoundError):
        rf.Index.load(tmp_path / "missing.safetensors")


def test_index_errors():
    with pytest.raises(ValueError, match="needs a bank"):
        rf.Index()
    with pytest.raises(ValueError, match="n_lists must be >= 1"):
        rf.Index(dim=4, n_lists=0)
    index = rf.Index(dim=4)
    with pytest.raises(ValueError, match="x must have D=4"):
        index.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="queries must have D=4"):
        index.search(torch.randn(3, 5), 2)
    assert index.search(torch.randn(3, 4), 2)[1].eq(-1).all()
    assert np.isinf(index.search(torch.randn(3, 4), 2)[0].numpy()).all()


def test_knn_reuses_the_bank_copy_only_while_the_bank_is_unchanged():
    q, x = _data(m=8, n=100, d=6)
    first = rf.knn(q, x, 3)
    assert [torch.equal(a, b) for a, b in zip(rf.knn(q, x, 3), first)] == [True, True]
    x[first[1][0, 0]] += 100.0  # an in-place edit bumps the version: the copy is rebuilt
    moved = rf.knn(q, x, 3)
    assert int(moved[1][0, 0]) != int(first[1][0, 0])
    assert [torch.equal(a, b) for a, b in zip(moved, rf.knn(q, x.clone(), 3))] == [True, True]
    x[5, 2] = float("nan")
    with pytest.raises(ValueError, match="bank must be finite"):
        rf.knn(q, x, 3)


def test_knn_keeps_the_bank_in_use_cached_across_a_short_lived_bank(monkeypatch):
    from raid_fast import bf16_filter, neighbors

    monkeypatch.setattr(bf16_filter, "MODE", "off")  # the float32 search's copies
    q, x = _data(m=8, n=100, d=6)
    prepared = []
    real = neighbors.search_vectors

    def spy(v, metric, side):
        if side == "bank":
            prepared.append(v)
        return real(v, metric, side)

    monkeypatch.setattr(neighbors, "search_vectors", spy)
    want = rf.knn(q, x, 3)
    for _ in range(3):
        rf.knn(q, x.clone(), 3)  # a bank that dies after the call
        assert [torch.equal(a, b) for a, b in zip(rf.knn(q, x, 3), want)] == [True, True]
    assert len(prepared) == 1 + 3  # x once, each clone once
    assert len(neighbors._BANK_CACHE) <= neighbors._BANK_CACHE_SIZE
