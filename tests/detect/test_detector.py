"""Detector, anomaly maps and the end-to-end retrieval-only pipeline on the embedded dataset."""

import numpy as np
import pytest
import torch

import raid_fast as rf
from raid_fast.detect.anomaly_map import AnomalyMapGenerator, gaussian_blur, top_percent_mean
from raid_fast.detect.filter import GuidedMoEFilter


class ToyBackbone:
    """A fixed random conv 'backbone' (stride 4): tokens [B, h*w, D], cls [B, D]."""

    def __init__(self, dim=8, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(dim, 3, 4, 4, generator=gen)
        self.dim = dim

    def __call__(self, images):
        feats = torch.nn.functional.conv2d(torch.as_tensor(images), self.weight, stride=4)  # [B, D, h, w]
        b, d, h, w = feats.shape
        tokens = feats.flatten(2).transpose(1, 2)
        return tokens, tokens.mean(dim=1), (h, w)


def make_detector(filter=None, k=6):
    gen = torch.Generator().manual_seed(1)
    templates = torch.rand(6, 3, 16, 16, generator=gen)
    bb = ToyBackbone()
    tokens, cls, _ = bb(templates)
    db = rf.TokenDatabase.build(tokens, cls, n_semantic=4, kmeans_iters=3)
    return rf.Detector(bb, db, filter=filter, k=k, nprobe=2), templates


def test_gaussian_blur_equals_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 23, 40, dtype=torch.float64)
    ref = np.stack([ndimage.gaussian_filter(m, 4.0) for m in x.numpy()])
    assert np.allclose(gaussian_blur(x, 4.0).numpy(), ref, atol=1e-12)
    assert torch.equal(gaussian_blur(x, 0.0), x)


def test_anomaly_map_and_top_percent():
    s = torch.zeros(1, 10, 10)
    s[0, 3, 4] = 5.0
    up = AnomalyMapGenerator(sigma=0.0)(s, (19, 19))
    assert up.shape == (1, 19, 19) and float(up.max()) == 5.0 and float(up[0, 6, 8]) == 5.0  # align_corners
    assert torch.allclose(top_percent_mean(s), torch.tensor([5.0]))  # 1 % of 100 values is one value
    s2 = torch.arange(1000.0).view(1, 25, 40)
    assert torch.allclose(top_percent_mean(s2), torch.tensor([sum(range(990, 1000)) / 10.0]))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        AnomalyMapGenerator(sigma=-1)


def test_predict_retrieval_only_shapes_and_determinism():
    det, templates = make_detector()
    images = torch.rand(3, 3, 16, 16)
    out = det.predict(images)
    assert out.pixel_map.shape == (3, 16, 16) and out.score.shape == (3,) and out.score_map.shape == (3, 4, 4)
    again = det.predict(images.numpy())
    assert torch.equal(out.pixel_map, again.pixel_map) and torch.equal(out.score, again.score)
    # a template scores zero on itself: every token has an exact match in the database
    self_out = det.predict(templates[:2])
    assert torch.allclose(self_out.score_map, torch.zeros_like(self_out.score_map), atol=1e-5)
    # S is the 1-NN cost without a filter
    res = rf.retrieve(*det.backbone(images)[:1], det.db, class_ids=out.class_ids, k=6, nprobe=2)
    assert torch.allclose(out.score_map.flatten(1), res.dist[..., 0])


def test_predict_with_filter_adds_the_filter_map_and_restores_train_mode():
    moe = GuidedMoEFilter(dim=8, k=6)
    det, _ = make_detector(filter=moe)
    moe.train()
    images = torch.rand(2, 3, 16, 16)
    out = det.predict(images)
    assert moe.training, "predict must restore the filter's mode"
    base = make_detector()[0].predict(images)
    diff = out.score_map - base.score_map  # the filter's map M, in [0, 1]
    assert bool((diff >= -1e-6).all()) and bool((diff <= 1 + 1e-6).all()) and float(diff.abs().max()) > 0
    assert torch.equal(det.predict(images).score, out.score)


def test_detector_errors():
    det, _ = make_detector()
    with pytest.raises(ValueError, match="k must equal the filter's cost-volume depth 6, got k=5"):
        rf.Detector(det.backbone, det.db, filter=GuidedMoEFilter(dim=8, k=6), k=5)
    with pytest.raises(TypeError, match="db must be a raid_fast.TokenDatabase"):
        rf.Detector(det.backbone, object())


def test_retrieval_only_detects_embedded_defects(tmp_path):
    """End to end on the embedded dataset: real ImageNet features, retrieval only (ID0)."""
    pytest.importorskip("skimage")
    pytest.importorskip("timm")
    from raid_fast.data import MVTecDataset, make_embedded_dataset
    from raid_fast.detect.metrics import evaluate

    root = make_embedded_dataset(tmp_path / "embedded", image_size=64, n_train=8, n_test_good=3, n_test_bad=4)
    train = MVTecDataset(root, split="train", image_size=64)
    test = MVTecDataset(root, split="test", image_size=64)
    bb = rf.load_backbone("efficientnet_lite0", image_size=128)
    tokens, cls, _ = bb(torch.stack([train[i]["image"] for i in range(len(train))]))
    db = rf.TokenDatabase.build(tokens, cls, labels=torch.tensor(train.class_ids), n_semantic=10)
    det = rf.Detector(bb, db, k=20, nprobe=5)
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    masks = torch.stack([test[i]["mask"][0] for i in range(len(test))])
    out = det.predict(images)
    assert torch.equal(out.class_ids, torch.tensor(test.class_ids))
    metrics = evaluate(out.score, torch.tensor(test.labels), out.pixel_map, masks)
    assert metrics["I-AUROC"] > 0.8 and metrics["P-AUROC"] > 0.8, metrics


def _bilinear_align_corners(x: np.ndarray, size) -> np.ndarray:
    """[h, w] -> [H, W] bilinear with align_corners=True, written out in numpy (the oracle)."""
    h, w = x.shape
    ys = np.linspace(0, h - 1, size[0])
    xs = np.linspace(0, w - 1, size[1])
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = x[y0][:, x0] * (1 - fx) + x[y0][:, x1] * fx
    bottom = x[y1][:, x0] * (1 - fx) + x[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def test_pixel_map_is_the_blurred_upsampled_score_map():
    """Pinned against a numpy/scipy oracle at a small size: bilinear (align_corners) upsampling, then
    scipy's Gaussian (sigma 4); without the blur the map would differ by far more than the tolerance."""
    ndimage = pytest.importorskip("scipy.ndimage")
    det, _ = make_detector()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    out = det.predict(images)
    for b in range(2):
        up = _bilinear_align_corners(out.score_map[b].double().numpy(), (16, 16))
        expected = ndimage.gaussian_filter(up, 4.0)
        assert np.allclose(out.pixel_map[b].numpy(), expected, atol=1e-5)
        assert np.abs(up - expected).max() > 1e-3  # the blur matters here
    assert torch.equal(out.score, top_percent_mean(out.score_map, 1.0))


def test_guidance_is_query_tokens_then_prototypes():
    """G0 = cat(query tokens, top-1 semantic prototypes) on channels, row-major over the grid."""
    from raid_fast.detect.detector import guidance_maps

    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)  # [B, L, D], grid 2 x 3
    proto = -1.0 - torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    g = guidance_maps(tokens, proto, (2, 3))
    assert g.shape == (2, 6, 2, 3)
    assert torch.equal(g[:, :3], tokens.transpose(1, 2).reshape(2, 3, 2, 3))
    assert torch.equal(g[:, 3:], proto.transpose(1, 2).reshape(2, 3, 2, 3))
    assert torch.equal(g[1, :, 1, 2], torch.cat([tokens[1, 5], proto[1, 5]]))
    # the detector hands the filter exactly this
    det, _ = make_detector()
    images = torch.rand(1, 3, 16, 16)
    m = det.match(images)
    assert torch.equal(m.guidance, guidance_maps(m.tokens, m.retrieval.proto, m.grid))
    assert torch.equal(m.guidance[:, : det.db.dim].flatten(2).transpose(1, 2), m.tokens)
