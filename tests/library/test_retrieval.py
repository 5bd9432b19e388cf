"""retrieve(): hierarchical and flat results against a brute-force computation of the definition."""

import pytest
import torch
import torch.nn.functional as F

import raid_fast as rf
from raid_fast.ref.cost_volume import cost_volume_ref
from tests.library.test_database import make_templates
from tests.utils import assert_close_verbose, backend_params


def build_db(n_img=12, n_pos=20, dim=16, n_cls=3, n_sem=5, seed=0):
    patch, cls, labels = make_templates(n_img, n_pos, dim, n_cls, seed)
    db = rf.TokenDatabase.build(patch, cls, labels=labels, n_semantic=n_sem, kmeans_iters=5)
    return db, patch, cls, labels


def brute_force(q, db, class_ids, k, nprobe, mode, exclude=None):
    """Per query token, straight from the definition: dist/idx [B, L, K] (-1/inf padded)."""
    b, n_pos, _ = q.shape
    q = F.normalize(q, dim=-1)
    dist = torch.full((b, n_pos, k), float("inf"))
    idx = torch.full((b, n_pos, k), -1, dtype=torch.int64)
    for i in range(b):
        c = int(class_ids[i]) if class_ids is not None else None
        for p in range(n_pos):
            if mode == "hierarchical":
                n_sem = int(db.n_semantic[c])
                sims = db.semantic_prototypes[c, :n_sem] @ q[i, p]
                probed = torch.topk(sims, min(nprobe, n_sem)).indices
                cand = torch.cat(
                    [
                        torch.arange(int(db.list_offsets[c * db.s_max + j]), int(db.list_offsets[c * db.s_max + j + 1]))
                        for j in probed.tolist()
                    ]
                )
            elif c is not None:
                cand = torch.arange(int(db.class_offsets[c]), int(db.class_offsets[c + 1]))
            else:
                cand = torch.arange(db.n_tokens)
            if exclude is not None:
                cand = cand[db.token_image[cand] != int(exclude[i])]
            d = 1 - db.tokens[cand] @ q[i, p]
            take = min(k, cand.numel())
            top = torch.topk(d, take, largest=False)
            dist[i, p, :take], idx[i, p, :take] = top.values, cand[top.indices]
    return dist, idx


def assert_topk_equal_up_to_ties(dist, idx, ref_dist, ref_idx, atol=1e-5):
    """Distances close, sorted; ids equal except inside groups of equal distance (ignoring the
    group cut by K); every id -1 or valid."""
    assert_close_verbose("dist", dist, ref_dist, atol=atol, rtol=0)
    finite = torch.isfinite(dist)
    assert torch.equal(finite, torch.isfinite(ref_dist))
    assert torch.equal(idx < 0, ~finite), "idx -1 exactly where dist is inf"
    d = dist.masked_fill(~finite, float("inf"))
    assert bool((d[..., 1:] >= d[..., :-1] - 1e-6).all()), "not sorted ascending"
    flat_i = idx.reshape(-1, idx.shape[-1])
    flat_rd, flat_ri = ref_dist.reshape(-1, dist.shape[-1]), ref_idx.reshape(-1, idx.shape[-1])
    for row in torch.nonzero((flat_i != flat_ri).any(dim=1)).flatten().tolist():
        cut = flat_rd[row, -1]
        keep = flat_rd[row] < cut - atol  # ignore the tie group cut by K
        a = set(flat_i[row][keep].tolist())
        b = set(flat_ri[row][keep].tolist())
        assert a == b, f"row {row}: ids differ beyond ties: {sorted(a ^ b)[:6]}"


@pytest.mark.parametrize("backend", [p for p in backend_params("ivf_topk") if p.id != "cuda"])
@pytest.mark.parametrize("k,nprobe", [(7, 2), (30, 5), (150, 3)], ids=["k7-p2", "k30-p5", "k150-p3"])
def test_hierarchical_matches_brute_force(k, nprobe, backend):
    db, _, cls, _ = build_db()
    q = torch.randn(3, 20, 16)
    res = rf.retrieve(q, db, query_cls=cls[:3], k=k, nprobe=nprobe, backend=backend)
    ids = db.classify(cls[:3])
    assert torch.equal(res.class_ids, ids)
    ref_dist, ref_idx = brute_force(q, db, ids, k, nprobe, "hierarchical")
    assert res.dist.shape == (3, 20, k) and res.dist.dtype == torch.float32 and res.idx.dtype == torch.int64
    assert_topk_equal_up_to_ties(res.dist, res.idx, ref_dist, ref_idx)
    # guidance: the top-1 prototype of each token's class
    qn = F.normalize(q, dim=-1)
    for i in range(3):
        c = int(ids[i])
        sims = qn[i] @ db.semantic_prototypes[c, : int(db.n_semantic[c])].T
        assert torch.equal(res.proto_idx[i], c * db.s_max + sims.argmax(dim=1))
        assert torch.equal(res.proto[i], db.semantic_prototypes[c][sims.argmax(dim=1)])


@pytest.mark.parametrize("backend", [p for p in backend_params("cosine_topk") if p.id != "cuda"])
@pytest.mark.parametrize("single", [False, True], ids=["multi", "single"])
def test_flat_matches_brute_force(single, backend):
    db, _, cls, labels = build_db()
    q = torch.randn(2, 20, 16)
    ids = labels[:2] if single else None
    res = rf.retrieve(q, db, class_ids=ids, k=25, mode="flat", backend=backend)
    ref_dist, ref_idx = brute_force(q, db, ids, 25, None, "flat")
    assert_topk_equal_up_to_ties(res.dist, res.idx, ref_dist, ref_idx)


def test_flat_is_an_upper_bound_of_hierarchical_and_equal_with_every_list_probed():
    db, _, cls, labels = build_db(n_sem=4)
    q = torch.randn(2, 20, 16)
    hier = rf.retrieve(q, db, class_ids=labels[:2], k=10, nprobe=4)  # all lists of the class
    flat = rf.retrieve(q, db, class_ids=labels[:2], k=10, mode="flat")
    assert_topk_equal_up_to_ties(hier.dist, hier.idx, flat.dist, flat.idx)
    few = rf.retrieve(q, db, class_ids=labels[:2], k=10, nprobe=1)
    assert bool((few.dist >= flat.dist - 1e-6).all())


def test_fewer_candidates_than_k_pad_with_minus_one_and_pad_cost():
    db, _, cls, labels = build_db(n_img=3, n_pos=4, n_cls=3, n_sem=2)  # 4 tokens per class
    q = torch.randn(1, 4, 16)
    res = rf.retrieve(q, db, class_ids=labels[:1], k=10, nprobe=2)
    assert bool((res.idx[..., 4:] == -1).all()) and bool(torch.isinf(res.dist[..., 4:]).all())
    assert bool((res.idx[..., :4] >= 0).all())
    vol = res.cost_volume(2, 2, pad_cost=2.5)
    assert vol.shape == (1, 10, 2, 2)
    assert bool((vol[:, 4:] == 2.5).all())
    assert torch.allclose(vol[0, 0].flatten(), res.dist[0, :, 0])


@pytest.mark.parametrize("backend", [p for p in backend_params("ivf_topk") if p.id != "cuda"])
def test_exclude_images_never_returns_own_tokens(backend):
    db, patch, cls, labels = build_db()
    # a template queried against the database finds itself at distance 0 unless excluded
    q = patch[:2]
    own = rf.retrieve(q, db, class_ids=labels[:2], k=5, nprobe=5)
    assert torch.allclose(own.dist[..., 0], torch.zeros(2, 20), atol=1e-5)
    excl = rf.retrieve(q, db, class_ids=labels[:2], k=5, nprobe=5, exclude_images=torch.tensor([0, 1]), backend=backend)
    for i in range(2):
        got = excl.idx[i][excl.idx[i] >= 0]
        assert not bool((db.token_image[got] == i).any())
    ref_dist, ref_idx = brute_force(q, db, labels[:2], 5, 5, "hierarchical", exclude=torch.tensor([0, 1]))
    assert_topk_equal_up_to_ties(excl.dist, excl.idx, ref_dist, ref_idx)
    flat = rf.retrieve(q, db, k=5, mode="flat", exclude_images=torch.tensor([0, 1]), backend=backend)
    assert not bool((db.token_image[flat.idx[0]] == 0).any())


def test_grid_input_numpy_and_non_contiguous():
    db, _, cls, labels = build_db(n_pos=20)
    q = torch.randn(2, 20, 16)
    grid = q.transpose(1, 2).reshape(2, 16, 4, 5)  # [B, D, H, W], non-contiguous view source
    a = rf.retrieve(grid, db, class_ids=labels[:2], k=6)
    b = rf.retrieve(q.numpy(), db, class_ids=labels[:2].numpy(), k=6)
    c = rf.retrieve(q.transpose(0, 1).contiguous().transpose(0, 1), db, class_ids=labels[:2], k=6)
    assert torch.equal(a.idx, b.idx) and torch.equal(a.idx, c.idx)
    assert a.cost_volume().shape == (2, 6, 4, 5)
    with pytest.raises(ValueError, match="cost_volume needs h and w"):
        b.cost_volume()


@pytest.mark.parametrize("backend", [p for p in backend_params("ivf_topk_cost_volume") if p.id != "cuda"])
def test_grid_input_caches_the_cost_volume_of_the_search(backend):
    db, _, cls, labels = build_db()
    q = torch.randn(2, 20, 16)
    grid = q.transpose(1, 2).reshape(2, 16, 4, 5)  # [B, D, H, W]
    k = 40  # more than some tokens' probed lists hold: the volume has padded channels
    res = rf.retrieve(grid, db, class_ids=labels[:2], k=k, nprobe=2, backend=backend)
    tokens = rf.retrieve(q, db, class_ids=labels[:2], k=k, nprobe=2, backend=backend)
    assert torch.equal(res.dist, tokens.dist) and torch.equal(res.idx, tokens.idx)
    vol = res.cost_volume()
    assert vol.shape == (2, k, 4, 5) and vol.dtype == torch.float32
    assert bool(torch.isinf(res.dist).any()), "the case must have missing neighbours"
    assert_close_verbose("volume", vol, cost_volume_ref(res.dist, 4, 5), atol=0, rtol=0)
    # the volume built with the search is kept: the same tensor for the same arguments
    assert res.cost_volume(4, 5) is vol and res.cost_volume(4, 5, pad_cost=1.0) is vol
    # other arguments recompute, never returning the cached volume
    other = res.cost_volume(4, 5, pad_cost=2.5)
    assert other is not vol
    assert_close_verbose("volume", other, cost_volume_ref(res.dist, 4, 5, 2.5), atol=0, rtol=0)
    flipped = res.cost_volume(5, 4)
    assert flipped is not vol and flipped.shape == (2, k, 5, 4)
    assert_close_verbose("volume", flipped, cost_volume_ref(res.dist, 5, 4), atol=0, rtol=0)
    assert_close_verbose("volume", res.cost_volume(2, 10), cost_volume_ref(res.dist, 2, 10), atol=0, rtol=0)
    with pytest.raises(TypeError, match="h must be an int"):
        res.cost_volume(4.0, 5)
    # [B, L, D] input and flat mode have no cached volume and compute it as before
    assert tokens.cost_volume(4, 5) is not tokens.cost_volume(4, 5)
    assert_close_verbose("volume", tokens.cost_volume(4, 5), vol, atol=0, rtol=0)
    flat = rf.retrieve(grid, db, class_ids=labels[:2], k=k, mode="flat")
    assert flat.cost_volume() is not flat.cost_volume()


def test_zero_queries():
    db, _, cls, labels = build_db()
    res = rf.retrieve(torch.zeros(0, 20, 16), db, class_ids=torch.zeros(0, dtype=torch.int64), k=5)
    assert res.dist.shape == (0, 20, 5) and res.class_ids.shape == (0,)
    res = rf.retrieve(torch.zeros(2, 0, 16), db, class_ids=labels[:2], k=5, mode="flat")
    assert res.dist.shape == (2, 0, 5)


class TestErrors:
    def setup_method(self):
        self.db, _, self.cls, self.labels = build_db()
        self.q = torch.randn(2, 20, 16)

    def test_dim_mismatch(self):
        with pytest.raises(
            ValueError, match=r"query_tokens \[B, L, D\] must have D=16 like the database, got shape \(2, 20, 8\)"
        ):
            rf.retrieve(torch.randn(2, 20, 8), self.db, class_ids=self.labels[:2])

    @pytest.mark.parametrize("k", [0, -1])
    def test_k(self, k):
        with pytest.raises(ValueError, match=f"k must be >= 1, got {k}"):
            rf.retrieve(self.q, self.db, class_ids=self.labels[:2], k=k)

    @pytest.mark.parametrize("p,match", [(0, "nprobe must be >= 1, got 0"), (6, "nprobe must be <= 5, got 6")])
    def test_nprobe(self, p, match):
        with pytest.raises(ValueError, match=match):
            rf.retrieve(self.q, self.db, class_ids=self.labels[:2], nprobe=p)

    def test_nan(self):
        q = self.q.clone()
        q[1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="query_tokens must be finite"):
            rf.retrieve(q, self.db, class_ids=self.labels[:2])

    def test_wrong_device(self):
        with pytest.raises(ValueError, match="query_tokens on meta, database on cpu"):
            rf.retrieve(torch.empty(2, 20, 16, device="meta"), self.db, class_ids=self.labels[:2])

    def test_needs_class_for_multiclass_hierarchical(self):
        with pytest.raises(ValueError, match="needs query_cls or class_ids"):
            rf.retrieve(self.q, self.db)

    def test_bad_class_ids_and_mode(self):
        with pytest.raises(ValueError, match=r"class_ids must be in \[0, 3\)"):
            rf.retrieve(self.q, self.db, class_ids=torch.tensor([0, 3]))
        with pytest.raises(ValueError, match="mode must be one of"):
            rf.retrieve(self.q, self.db, class_ids=self.labels[:2], mode="ivf")
        with pytest.raises(TypeError, match="db must be a raid_fast.TokenDatabase"):
            rf.retrieve(self.q, {"tokens": 1})

    def test_bad_ndim(self):
        with pytest.raises(ValueError, match=r"query_tokens must be \[B, L, 16\] or \[B, 16, H, W\]"):
            rf.retrieve(torch.randn(20, 16), self.db, class_ids=self.labels[:2])


def test_matches_faiss_ivfflat_with_same_centroids_and_lists():
    faiss = pytest.importorskip("faiss")
    db, _, cls, labels = build_db(n_img=6, n_pos=30, n_cls=1, n_sem=6)
    q = torch.randn(1, 30, 16)
    k, p = 20, 3
    res = rf.retrieve(q, db, k=k, nprobe=p)
    quantizer = faiss.IndexFlatIP(16)
    index = faiss.IndexIVFFlat(quantizer, 16, db.s_max, faiss.METRIC_INNER_PRODUCT)
    quantizer.add(db.semantic_prototypes[0].numpy())
    index.is_trained = True
    # faiss assigns each token to its nearest centroid by inner product: our lists, barring exact ties
    index.add_with_ids(db.tokens.numpy(), torch.arange(db.n_tokens).numpy())
    for lst in range(db.n_lists):
        assert index.invlists.list_size(lst) == int(db.list_offsets[lst + 1] - db.list_offsets[lst])
    index.nprobe = p
    sims, ids = index.search(F.normalize(q[0], dim=-1).numpy(), k)
    ref_dist = torch.from_numpy(1 - sims).unsqueeze(0)
    ref_idx = torch.from_numpy(ids).unsqueeze(0)
    ref_dist = torch.where(ref_idx < 0, float("inf"), ref_dist)
    assert_topk_equal_up_to_ties(res.dist, res.idx, ref_dist, ref_idx, atol=1e-4)


@pytest.mark.parametrize("backend", [p for p in backend_params("ivf_topk") if p.id != "cuda"])
def test_hierarchical_with_a_class_of_fewer_prototypes_than_nprobe(backend):
    gen = torch.Generator().manual_seed(5)
    patch = torch.randn(5, 3, 16, generator=gen)
    cls = torch.randn(5, 16, generator=gen)
    labels = torch.tensor([0, 0, 0, 0, 1])  # class 1: one image of 3 tokens -> 3 prototypes
    db = rf.TokenDatabase.build(patch, cls, labels=labels, n_semantic=6, kmeans_iters=3)
    assert db.n_semantic.tolist() == [6, 3]
    q = torch.randn(2, 4, 16, generator=gen)
    ids = torch.tensor([1, 0])
    res = rf.retrieve(q, db, class_ids=ids, k=5, nprobe=5, backend=backend)
    ref_dist, ref_idx = brute_force(q, db, ids, 5, 5, "hierarchical")
    assert_topk_equal_up_to_ties(res.dist, res.idx, ref_dist, ref_idx)
    # the top-1 prototype is a real one of the image's class, whatever P
    qn = F.normalize(q, dim=-1)
    for i, c in enumerate(ids.tolist()):
        sims = qn[i] @ db.semantic_prototypes[c, : int(db.n_semantic[c])].T
        assert torch.equal(res.proto_idx[i], c * db.s_max + sims.argmax(dim=1))
        assert torch.allclose(res.proto[i], db.semantic_prototypes[c][sims.argmax(dim=1)])


def test_result_unpacks_like_faiss_and_maps_ids_to_template_order():
    db, patch, cls, labels = build_db()
    q = torch.randn(2, 20, 16)
    res = rf.retrieve(q, db, query_cls=cls[:2], k=4, nprobe=2)
    dist, idx = res
    assert dist is res.dist and idx is res.idx
    # template_ids index the [I, L, D] patch tokens the database was built from, row-major
    t_ids = res.template_ids
    ok = idx >= 0
    assert torch.equal(t_ids < 0, ~ok)
    flat_patch = F.normalize(patch.reshape(-1, 16), dim=1)
    torch.testing.assert_close(flat_patch[t_ids[ok]], db.tokens[idx[ok]])


def test_build_without_cls_tokens_routes_by_mean_patch():
    patch, cls, labels = make_templates(n_img=12, n_pos=20, dim=16, n_cls=3)
    single = rf.TokenDatabase.build(patch, n_semantic=4, kmeans_iters=3)
    assert single.n_classes == 1 and single.params["cls_source"] == "mean_patch"
    res = rf.retrieve(patch[:2], single, k=3, nprobe=2)
    assert torch.equal(res.class_ids, torch.zeros(2, dtype=torch.int64))
    labelled = rf.TokenDatabase.build(patch, labels=labels, n_semantic=4, kmeans_iters=3)
    # routed by the queries' mean patch token, as the class prototypes were built
    res = rf.retrieve(patch[:6], labelled, k=3, nprobe=2)
    assert torch.equal(res.class_ids, labelled.classify(patch[:6].mean(dim=1)))
    assert torch.equal(res.class_ids, labels[:6])
    labelled.add(patch[6:8])
    assert labelled.n_images == 14


@pytest.mark.parametrize("backend", backend_params("ivf_topk_cost_volume"))
def test_grid_request_builds_the_volume_in_the_search(backend, monkeypatch):
    from raid_fast import _dispatch

    db, patch, cls, labels = build_db(n_pos=12)
    q = torch.randn(2, 12, 16)
    calls = []
    real = _dispatch.call

    def spy(op, *args, **kwargs):
        calls.append(op)
        return real(op, *args, **kwargs)

    monkeypatch.setattr(_dispatch, "call", spy)
    res = rf.retrieve(q, db, class_ids=labels[:2], k=5, nprobe=2, grid=(3, 4), pad_cost=2.0, backend=backend)
    assert "ivf_topk_cost_volume" in calls and "ivf_topk" not in calls and "cost_volume" not in calls
    volume = res.cost_volume(3, 4, pad_cost=2.0)
    assert volume is res.cost_volume(pad_cost=2.0)  # reused, not rebuilt
    torch.testing.assert_close(volume, cost_volume_ref(res.dist, 3, 4, 2.0))
    grid_in = rf.retrieve(q.transpose(1, 2).reshape(2, 16, 3, 4), db, class_ids=labels[:2], k=5, nprobe=2)
    assert torch.equal(grid_in.idx, res.idx)
    with pytest.raises(ValueError, match="grid must match the query tokens"):
        rf.retrieve(q, db, class_ids=labels[:2], k=5, grid=(4, 4))
