"""Detector, anomaly maps and the end-to-end retrieval-only pipeline on the embedded dataset."""

import numpy as np
import pytest
import torch

import raid_fast as rf
from raid_fast.detect.anomaly_map import AnomalyMapGenerator, ImageScore, gaussian_blur, image_score, top_percent_mean
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
    up = AnomalyMapGenerator(sigma=0.0, align_corners=True)(s, (19, 19))
    assert up.shape == (1, 19, 19) and float(up.max()) == 5.0 and float(up[0, 6, 8]) == 5.0  # align_corners
    # the default keeps a token at the centre of its pixels: token 3 of 10 covers pixels 6-7 of 20
    centred = AnomalyMapGenerator(sigma=0.0)(s, (20, 20))
    assert float(centred[0, 6, 8]) == float(centred[0, 7, 9]) > 0.5 * 5.0 and float(centred.max()) < 5.0
    assert torch.allclose(top_percent_mean(s), torch.tensor([5.0]))  # 1 % of 100 values is one value
    s2 = torch.arange(1000.0).view(1, 25, 40)
    assert torch.allclose(top_percent_mean(s2), torch.tensor([sum(range(990, 1000)) / 10.0]))
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        AnomalyMapGenerator(sigma=-1)


def test_image_score_reductions():
    s = torch.stack([torch.arange(100.0), torch.arange(100.0).flip(0) * 2]).view(2, 10, 10)
    assert torch.equal(image_score(s, "max"), torch.tensor([99.0, 198.0]))
    assert torch.equal(image_score(s, "top3"), torch.tensor([98.0, 196.0]))
    assert torch.equal(image_score(s, "top1000"), s.flatten(1).mean(1))  # k above h * w: the whole map
    assert torch.equal(image_score(s, "top10%"), torch.tensor([94.5, 189.0]))
    assert torch.equal(image_score(s, "top2.5%"), top_percent_mean(s, 2.5))  # 2 of 100 values
    assert torch.equal(image_score(s), top_percent_mean(s, 1.0))  # the default, the authors' top 1 %
    assert ImageScore("top7").spec == "top7"
    for bad in ["top0", "top0%", "top101%", "mean", "top-1", " max", 3, None]:
        with pytest.raises(ValueError, match="image_score must be 'max', 'top<k>'"):
            ImageScore(bad)


def test_detector_image_score_option():
    det, _ = make_detector()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    out = det.predict(images)
    assert det.image_score.spec == "top1%"
    for spec in ("max", "top2", "top50%"):
        other = rf.Detector(det.backbone, det.db, k=6, nprobe=2, image_score=spec).predict(images)
        assert torch.equal(other.score_map, out.score_map) and torch.equal(other.pixel_map, out.pixel_map)
        assert torch.equal(other.score, image_score(out.score_map, spec))
    with pytest.raises(ValueError, match="image_score"):
        rf.Detector(det.backbone, det.db, image_score="median")


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


def _bilinear(x: np.ndarray, size, align_corners: bool) -> np.ndarray:
    """[h, w] -> [H, W] bilinear, written out in numpy (the oracle). align_corners=True: the corner
    tokens on the corner pixels; False: output pixel i samples the input at (i + 0.5) * h / H - 0.5,
    the centre of the pixels a token covers, clamped at the first token."""
    h, w = x.shape
    if align_corners:
        ys, xs = np.linspace(0, h - 1, size[0]), np.linspace(0, w - 1, size[1])
    else:
        ys = np.maximum((np.arange(size[0]) + 0.5) * h / size[0] - 0.5, 0.0)
        xs = np.maximum((np.arange(size[1]) + 0.5) * w / size[1] - 0.5, 0.0)
    y0, x0 = np.minimum(np.floor(ys).astype(int), h - 1), np.minimum(np.floor(xs).astype(int), w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = x[y0][:, x0] * (1 - fx) + x[y0][:, x1] * fx
    bottom = x[y1][:, x0] * (1 - fx) + x[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("align_corners", [False, True])
def test_pixel_map_is_the_blurred_upsampled_score_map(align_corners):
    """Pinned against a numpy/scipy oracle at a small size: bilinear upsampling (centre-aligned by
    default, the authors' corner-aligned as an option), then scipy's Gaussian (sigma 4); without the
    blur, or with the other alignment, the map would differ by far more than the tolerance."""
    ndimage = pytest.importorskip("scipy.ndimage")
    det, _ = make_detector()
    det = rf.Detector(det.backbone, det.db, k=6, nprobe=2, align_corners=align_corners)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    out = det.predict(images)
    for b in range(2):
        smap = out.score_map[b].double().numpy()
        up = _bilinear(smap, (16, 16), align_corners)
        expected = ndimage.gaussian_filter(up, 4.0)
        assert np.allclose(out.pixel_map[b].numpy(), expected, atol=1e-5)
        assert np.abs(up - expected).max() > 1e-3  # the blur matters here
        other = ndimage.gaussian_filter(_bilinear(smap, (16, 16), not align_corners), 4.0)
        assert np.abs(other - expected).max() > 1e-4  # and so does the alignment
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
