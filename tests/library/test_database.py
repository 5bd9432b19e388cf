"""TokenDatabase: build (labelled, label-free, single class), grouping invariants, add, save/load."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import raid_fast as rf
from raid_fast.database_io import FORMAT_VERSION


def make_templates(n_img=12, n_pos=20, dim=16, n_cls=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_img) % n_cls
    centers = 4 * torch.randn(n_cls, dim, generator=gen)
    cls = centers[labels] + 0.3 * torch.randn(n_img, dim, generator=gen)
    patch = torch.randn(n_img, n_pos, dim, generator=gen) + centers[labels][:, None, :] * 0.5
    return patch, cls, labels


def check_invariants(db, patch, tie_tol=1e-5):
    n_img, n_pos, dim = patch.shape
    assert db.tokens.shape == (n_img * n_pos, dim)
    assert torch.allclose(db.tokens.norm(dim=1), torch.ones(db.n_tokens), atol=1e-5)
    # every token is the normalised patch token it came from
    src = F.normalize(patch[db.token_image, db.token_pos], dim=1)
    assert torch.allclose(db.tokens, src, atol=1e-6)
    # each (image, pos) appears exactly once
    key = db.token_image * n_pos + db.token_pos
    assert torch.equal(torch.sort(key).values, torch.arange(n_img * n_pos))
    assert db.list_offsets[0] == 0 and db.list_offsets[-1] == db.n_tokens
    assert bool((db.list_offsets[1:] >= db.list_offsets[:-1]).all())
    s = db.s_max
    for lst in range(db.n_lists):
        lo, hi = db.list_offsets[lst].item(), db.list_offsets[lst + 1].item()
        c, j = divmod(lst, s)
        assert bool((db.image_class[db.token_image[lo:hi]] == c).all())
        if hi > lo:
            assert j < int(db.n_semantic[c])
            # the list holds the tokens whose nearest prototype of the class is j (up to ties)
            sims = db.tokens[lo:hi] @ db.semantic_prototypes[c, : int(db.n_semantic[c])].T
            assert bool((sims.max(dim=1).values - sims[:, j] <= tie_tol).all())
    valid = db.semantic_prototypes.norm(dim=-1)
    for c in range(db.n_classes):
        k = int(db.n_semantic[c])
        assert torch.allclose(valid[c, :k], torch.ones(k), atol=1e-5)
        assert bool((valid[c, k:] == 0).all())


def test_build_labelled():
    patch, cls, labels = make_templates()
    db = rf.TokenDatabase.build(patch, cls, labels=labels, n_semantic=6, kmeans_iters=5)
    assert db.n_classes == 3 and db.s_max == 6 and db.params["mode"] == "labels"
    assert torch.equal(db.image_class, labels)
    assert db.n_semantic.tolist() == [6, 6, 6]
    assert torch.allclose(db.class_prototypes.norm(dim=1), torch.ones(3), atol=1e-6)
    check_invariants(db, patch)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_build_with_half_precision_kmeans(precision):
    patch, cls, labels = make_templates()
    db = rf.TokenDatabase.build(patch, cls, n_classes=3, n_semantic=6, kmeans_iters=5, kmeans_precision=precision)
    assert db.params["kmeans_precision"] == precision
    # a list holds the tokens nearest its prototype up to the rounding of the assignment
    check_invariants(db, patch, tie_tol={"fp16": 2e-3, "bf16": 1.6e-2}[precision])
    # retrieval stays exact over the probed lists whatever the clustering: all lists probed = flat
    q = torch.randn(2, 5, 16)
    hier = rf.retrieve(q, db, class_ids=torch.tensor([0, 2]), k=4, nprobe=6)
    flat = rf.retrieve(q, db, class_ids=torch.tensor([0, 2]), k=4, mode="flat")
    assert torch.allclose(hier.dist, flat.dist, atol=1e-6)
    with pytest.raises(ValueError, match=r"kmeans_precision must be one of \['fp32', 'fp16', 'bf16'\], got 'half'"):
        rf.TokenDatabase.build(patch, cls, kmeans_precision="half")


def test_build_label_free_reports_purity():
    patch, cls, labels = make_templates()
    db = rf.TokenDatabase.build(patch, cls, labels=labels, n_classes=3, n_semantic=4, kmeans_iters=10)
    assert db.params["mode"] == "kmeans"
    assert db.class_purity == 1.0  # well-separated CLS clusters
    check_invariants(db, patch)
    unlabelled = rf.TokenDatabase.build(patch, cls, n_classes=3, n_semantic=4, kmeans_iters=10)
    assert unlabelled.class_purity is None


def test_build_single_class_and_small_class():
    patch, cls, _ = make_templates(n_img=2, n_pos=3)
    db = rf.TokenDatabase.build(patch, cls, n_semantic=50, kmeans_iters=3)
    assert db.n_classes == 1 and db.n_semantic.tolist() == [6]  # fewer tokens than prototypes
    check_invariants(db, patch)


def test_build_accepts_bdhw_and_numpy():
    patch, cls, labels = make_templates(n_pos=12)
    grid = patch.transpose(1, 2).reshape(12, 16, 3, 4)  # [I, D, H, W]
    a = rf.TokenDatabase.build(grid.numpy(), cls.numpy(), labels=labels.numpy(), n_semantic=3, kmeans_iters=3)
    b = rf.TokenDatabase.build(patch, cls, labels=labels, n_semantic=3, kmeans_iters=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.token_pos, b.token_pos)


def test_build_errors():
    patch, cls, labels = make_templates()
    with pytest.raises(ValueError, match=r"cls_tokens must have shape \[12, 16\]"):
        rf.TokenDatabase.build(patch, cls[:5], labels=labels)
    with pytest.raises(ValueError, match="labels must have one entry per image"):
        rf.TokenDatabase.build(patch, cls, labels=labels[:3])
    with pytest.raises(TypeError, match="labels must be integers"):
        rf.TokenDatabase.build(patch, cls, labels=labels.float())
    with pytest.raises(ValueError, match="n_classes must be <= 12"):
        rf.TokenDatabase.build(patch, cls, n_classes=13)
    with pytest.raises(ValueError, match="n_semantic must be >= 1"):
        rf.TokenDatabase.build(patch, cls, n_semantic=0)
    with pytest.raises(ValueError, match="at least one image"):
        rf.TokenDatabase.build(patch[:0], cls[:0])
    bad = patch.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="patch_tokens must be finite"):
        rf.TokenDatabase.build(bad, cls)


def test_add_keeps_grouping_and_is_retrievable():
    patch, cls, labels = make_templates()
    db = rf.TokenDatabase.build(patch[:9], cls[:9], labels=labels[:9], n_semantic=4, kmeans_iters=5)
    protos = db.semantic_prototypes.clone()
    db.add(patch[9:], cls[9:], labels=labels[9:])
    assert db.n_images == 12 and db.n_tokens == 12 * 20
    assert torch.equal(db.semantic_prototypes, protos)
    assert torch.equal(db.image_class, labels)
    check_invariants(db, patch)
    # label-free add routes by CLS
    db2 = rf.TokenDatabase.build(patch[:9], cls[:9], n_classes=3, n_semantic=4, kmeans_iters=5)
    db2.add(patch[9:], cls[9:])
    check_invariants(db2, patch)
    with pytest.raises(ValueError, match="unknown"):
        db.add(patch[:1], cls[:1], labels=torch.tensor([7]))


def test_save_load_round_trip(tmp_path):
    patch, cls, labels = make_templates()
    db = rf.TokenDatabase.build(patch, cls, labels=labels, n_classes=3, n_semantic=4, kmeans_iters=5)
    path = tmp_path / "db.safetensors"
    db.save(path)
    back = rf.TokenDatabase.load(path)
    tensors = [f.name for f in dataclasses.fields(db) if f.compare and isinstance(getattr(db, f.name), torch.Tensor)]
    assert len(tensors) == 8
    for name in tensors:
        assert torch.equal(getattr(back, name), getattr(db, name)), name
    assert back.params == db.params and back.class_purity == db.class_purity
    assert [p.name for p in tmp_path.iterdir()] == ["db.safetensors"]  # no temporary left behind


def test_load_rejects_damaged_truncated_and_other_versions(tmp_path):
    from safetensors.torch import load_file, save_file

    patch, cls, labels = make_templates()
    db = rf.TokenDatabase.build(patch, cls, labels=labels, n_semantic=4, kmeans_iters=3)
    path = tmp_path / "db.safetensors"
    db.save(path)
    raw = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="damaged or truncated"):
        rf.TokenDatabase.load(truncated)

    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # inside the last tensor's data
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        rf.TokenDatabase.load(damaged)

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    other = tmp_path / "v99.safetensors"
    save_file(tensors, str(other), metadata={**meta, "format_version": "99"})
    with pytest.raises(ValueError, match=f"format version '99'; this raid_fast reads version {FORMAT_VERSION}"):
        rf.TokenDatabase.load(other)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="not a raid_fast token database"):
        rf.TokenDatabase.load(foreign)
    with pytest.raises(FileNotFoundError):
        rf.TokenDatabase.load(tmp_path / "missing.safetensors")
    assert json.loads(meta["params"])["n_semantic"] == 4
