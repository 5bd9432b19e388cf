"""Routing inputs: a CLS token that is NaN, zero or too large has no nearest class and is refused,
never routed to class 0; KMeans refuses float32 points whose squared distances overflow."""

import pytest
import torch

import raid_fast as rf
from raid_fast import routing
from tests.library.test_database import make_templates


@pytest.fixture(scope="module")
def db():
    patch, cls, labels = make_templates()
    return rf.TokenDatabase.build(patch, cls, labels=labels, n_semantic=3, kmeans_iters=2)


@pytest.mark.parametrize(
    ("fill", "match"),
    [
        (float("nan"), r"query_cls must be finite, got NaN/inf values at image 1"),
        (float("inf"), r"query_cls must be finite, got NaN/inf values at image 1"),
        (0.0, r"query_cls must have a direction for every image, got an all-zero vector at image 1"),
        (1e30, r"query_cls is too large to normalise in float32 at image 1"),
    ],
)
def test_query_cls_without_a_direction_is_refused(db, fill, match):
    patch, cls, _ = make_templates()
    q_cls = cls[:3].clone()
    q_cls[1] = fill
    with pytest.raises(ValueError, match=match):
        routing.check_query_cls(db, q_cls, 3)
    with pytest.raises(ValueError, match=match):
        rf.retrieve(patch[:3], db, query_cls=q_cls, k=4, nprobe=2)
    with pytest.raises(ValueError, match=match.replace("query_cls", "cls_tokens")):
        db.classify(q_cls)
    # a single NaN component is enough
    q_cls = cls[:3].clone()
    q_cls[2, 5] = float("nan")
    with pytest.raises(ValueError, match="at image 2"):
        rf.retrieve(patch[:3], db, query_cls=q_cls, k=4, nprobe=2)


def test_valid_query_cls_still_routes(db):
    patch, cls, labels = make_templates()
    res = rf.retrieve(patch, db, query_cls=cls * 1e-20, k=4, nprobe=2)  # tiny but with a direction
    assert torch.equal(res.class_ids, db.classify(cls))
    assert torch.equal(res.class_ids, labels)


def test_fp32_kmeans_refuses_points_whose_squared_distances_overflow():
    from tests.utils import blobs

    x = blobs(1, 64, 4, 3)[0]
    ok = rf.kmeans(x * 1e17, 3, niter=2)  # (1e17)^2 * 4 * 4 fits in float32
    assert torch.isfinite(ok.centroids).all()
    for precision in ("fp32", "fp16", "bf16"):
        with pytest.raises(ValueError, match="squared distances would overflow float32|outside the fp16 range"):
            rf.kmeans(x * 1e19, 3, niter=2, precision=precision)
    with pytest.raises(ValueError, match=r"x is too large for precision='fp32'.*max \|x\| = .*e\+19, D = 4"):
        rf.kmeans(x * 1e19, 3, niter=2)
