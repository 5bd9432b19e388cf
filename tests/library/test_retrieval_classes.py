"""Flat retrieval on a database whose classes differ in size: the class of each token comes from
the class offsets, never from equal class sizes (every other test database has equal sizes)."""

import pytest
import torch

import raid_fast as rf

SIZES = (2, 5, 3)  # template images per class: tokens per class 8, 20, 12


@pytest.fixture(scope="module")
def uneven():
    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(SIZES)])
    centers = 3 * torch.randn(len(SIZES), 8, generator=gen)
    patch = centers[labels][:, None, :] + torch.randn(len(labels), 4, 8, generator=gen)
    cls = centers[labels] + 0.1 * torch.randn(len(labels), 8, generator=gen)
    db = rf.TokenDatabase.build(patch, cls, labels=labels, n_semantic=2, kmeans_iters=3)
    assert (db.class_offsets[1:] - db.class_offsets[:-1]).tolist() == [4 * n for n in SIZES]
    return db


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("c", range(len(SIZES)))
def test_flat_class_inference_at_the_class_boundaries(uneven, c, where):
    """An image whose tokens all equal the first (or last) token of class c is of class c."""
    db = uneven
    off = db.class_offsets.tolist()
    t = off[c] if where == "first" else off[c + 1] - 1
    query = db.tokens[t].expand(1, 3, -1).clone()  # [1, 3, D]
    res = rf.retrieve(query, db, k=2, mode="flat")
    assert int(res.idx[0, 0, 0]) == t
    assert res.class_ids.tolist() == [c]
    assert int(res.proto_idx[0, 0]) // db.s_max == c  # guidance from the inferred class


@pytest.mark.parametrize("c", range(len(SIZES)))
def test_flat_single_class_search_stays_in_its_class(uneven, c):
    """With class_ids, flat search returns exactly the class's tokens (K above its size: the rest -1)."""
    db = uneven
    lo, hi = db.class_offsets[c].item(), db.class_offsets[c + 1].item()
    k = max(SIZES) * 4 + 2
    query = torch.randn(2, 5, db.dim, generator=torch.Generator().manual_seed(c))
    res = rf.retrieve(query, db, class_ids=torch.tensor([c, c]), k=k, mode="flat")
    found = res.idx[res.idx >= 0]
    assert bool(((found >= lo) & (found < hi)).all())
    for row in res.idx.reshape(-1, k):
        assert sorted(row[row >= 0].tolist()) == list(range(lo, hi))
    # and the order is the exact one
    qn = torch.nn.functional.normalize(query, dim=-1)
    exact = 1 - qn @ db.tokens[lo:hi].T  # [2, 5, n_c]
    assert torch.allclose(res.dist[..., : hi - lo], exact.sort(dim=-1).values, atol=1e-5)
