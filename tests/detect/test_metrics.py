"""raid_fast.detect.metrics against scikit-learn, a slow threshold-loop AUPRO and hand-computed curves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raid_fast.detect import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")
ndimage = pytest.importorskip("scipy.ndimage")

EIGHT = np.ones((3, 3), dtype=bool)


def _sk_f1max(labels, scores):
    p, r, _ = sklearn_metrics.precision_recall_curve(labels, scores)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return float(f1.max())


def _sk_all(labels, scores):
    return (
        sklearn_metrics.roc_auc_score(labels, scores),
        sklearn_metrics.average_precision_score(labels, scores),
        _sk_f1max(labels, scores),
    )


def _slow_aupro(maps, masks, limit):
    """MVTec AUPRO by brute force: one pass over the pixels per distinct threshold."""
    regions = []
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=EIGHT)
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append(above[normal].mean())
        pros.append(np.mean([above[i][r].mean() for i, r in regions]))
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:]):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (limit - x0)
    return area / limit


def _random_masks(rng, n, h, w, n_normal=1):
    """Blobby masks (thresholded box-smoothed noise) with n_normal all-zero images."""
    noise = rng.random((n, h + 2, w + 2))
    smooth = sum(noise[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
    masks = smooth > np.quantile(smooth, 0.8)
    masks[:n_normal] = False
    return masks


def _hand_case():
    """Two 2 x 5 images; image 0 holds region A (1 px) and region B (3 px joined only diagonally).

    Normal pixels: 16, so one FPR step is 1/16. Thresholds, high to low:
      0.9  A            -> (0, 1/2)
      0.8  B1           -> (0, 2/3)
      0.7  one normal   -> (1/16, 2/3)
      0.6  B2           -> (1/16, 5/6)
      0.5  two normals  -> (3/16, 5/6)
      0.4  two normals and B3 -> (5/16, 1), a diagonal step that crosses fpr 0.3 = 4.8/16 at
           fraction 0.9, where pro = 5/6 + 0.9 / 6 = 59/60
      0.1  the other 11 normals -> (1, 1)
    Area to 0.3: 2/3 / 16 + 5/6 * 2/16 + (5/6 + 59/60) / 2 * 1.8/16 = 2381/9600, AUPRO = 2381/2880.
    Under 4-connectivity B would be three regions and the value would differ.
    """
    maps = np.full((2, 2, 5), 0.1)
    masks = np.zeros((2, 2, 5), dtype=bool)
    maps[0, 0, 0] = 0.9
    for (r, c), v in zip([(0, 2), (1, 3), (0, 4)], [0.8, 0.6, 0.4]):
        maps[0, r, c] = v
        masks[0, r, c] = True
    masks[0, 0, 0] = True
    maps[0, 0, 1] = 0.7
    maps[0, 1, 0] = 0.5
    maps[1, 0, 0] = 0.5
    maps[1, 0, 1] = 0.4
    maps[1, 0, 2] = 0.4
    return maps, masks


@pytest.mark.parametrize("n", [2, 3, 5, 8, 31, 200, 1001])
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_image_metrics_match_sklearn(n, decimals):
    rng = np.random.default_rng(n * 10 + (decimals or 0))
    labels = rng.random(n) < 0.4
    labels[0], labels[-1] = False, True
    scores = rng.random(n) + 0.3 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    expected = _sk_all(labels, scores)
    got = (metrics.auroc(scores, labels), metrics.average_precision(scores, labels), metrics.f1_max(scores, labels))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    out = metrics.evaluate(torch.from_numpy(scores), torch.from_numpy(labels.astype(np.int64)))
    np.testing.assert_allclose([out[k] for k in metrics.IMAGE_METRICS], expected, rtol=1e-12, atol=1e-12)


def test_all_scores_tied_and_extreme_orders():
    labels = np.array([0, 1, 1, 0, 1])
    for scores in (np.zeros(5), np.array([0.0, 1, 1, 0, 1]), np.array([1.0, 0, 0, 1, 0])):
        got = (metrics.auroc(scores, labels), metrics.average_precision(scores, labels), metrics.f1_max(scores, labels))
        np.testing.assert_allclose(got, _sk_all(labels, scores), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 7), (3, 5, 4), (6, 17, 13)])
def test_pixel_metrics_match_sklearn(shape):
    rng = np.random.default_rng(sum(shape))
    masks = _random_masks(rng, *shape, n_normal=0)
    masks.flat[0], masks.flat[-1] = True, False
    maps = np.round(rng.random(shape) + 0.5 * masks, 1).astype(np.float32)
    out = metrics.evaluate(maps.reshape(shape[0], -1).max(1), masks.any((1, 2)), maps, masks)
    expected = _sk_all(masks.ravel(), maps.ravel())
    np.testing.assert_allclose([out[k] for k in ("P-AUROC", "P-AP", "P-F1max")], expected, rtol=1e-12, atol=1e-12)


def test_small_chunks_give_the_same_results(monkeypatch):
    # tie groups then span chunk boundaries
    rng = np.random.default_rng(3)
    masks = _random_masks(rng, 5, 12, 10)
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 1)
    scores, labels = maps.max((1, 2)), masks.any((1, 2))
    base = metrics.evaluate(scores, labels, maps, masks, pro_fpr_limit=0.2)
    monkeypatch.setattr(metrics, "_CHUNK", 3)
    assert metrics.evaluate(scores, labels, maps, masks, pro_fpr_limit=0.2) == pytest.approx(base, rel=1e-12)
    np.testing.assert_allclose(metrics.auroc(maps, masks), sklearn_metrics.roc_auc_score(masks.ravel(), maps.ravel()))


@pytest.mark.parametrize(("limit", "expected"), [(0.3, 2381 / 2880), (3 / 16, 7 / 9), (1.0, 91 / 96), (1 / 32, 2 / 3)])
def test_aupro_hand_computed(limit, expected):
    maps, masks = _hand_case()
    # limit 3/16 lands exactly on a curve point; 1/32 cuts the flat segment at pro 2/3 halfway, so the normalised area is 2/3
    assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected, rel=1e-12)
    assert _slow_aupro(maps, masks, limit) == pytest.approx(expected, rel=1e-12)


def test_aupro_hand_case_is_8_connected():
    maps, masks = _hand_case()
    labels, n = metrics.connected_components(masks[0])
    assert n == 2
    assert labels[0, 2] == labels[1, 3] == labels[0, 4] != labels[0, 0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.3, 0.05, 0.77, 1.0])
def test_aupro_matches_threshold_loop(seed, limit):
    rng = np.random.default_rng(seed)
    n, h, w = 2 + seed % 3, 7 + seed, 9 + 2 * seed
    masks = _random_masks(rng, n, h, w, n_normal=seed % 2)
    decimals = 1 if seed % 2 else 2
    maps = np.round(rng.random((n, h, w)) + 0.3 * masks, decimals).astype(np.float32)
    got = metrics.aupro(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.uint8)), fpr_limit=limit)
    assert got == pytest.approx(_slow_aupro(maps, masks, limit), rel=1e-10, abs=1e-12)


def _masks_for_components():
    rng = np.random.default_rng(11)
    cases = [rng.random(shape) < p for shape in [(1, 1), (1, 9), (8, 1), (13, 17), (32, 31)] for p in (0.2, 0.45, 0.7)]
    checker = (np.add.outer(np.arange(9), np.arange(11)) % 2).astype(bool)
    spiral = np.zeros((15, 15), dtype=bool)
    spiral[[0, 14], :] = True
    spiral[:, [0, 14]] = True
    spiral[2:13, 2] = spiral[2, 2:12] = spiral[2:12, 12] = spiral[12, 4:13] = spiral[4:12, 4] = True
    spiral[1, 1:] = False
    return [*cases, checker, ~checker, spiral, np.zeros((4, 4), bool), np.ones((4, 5), bool)]


@pytest.mark.parametrize("case", range(len(_masks_for_components())))
def test_connected_components_match_scipy(case):
    mask = _masks_for_components()[case]
    expected, n_expected = ndimage.label(mask, structure=EIGHT)
    labels, n = metrics.connected_components(torch.from_numpy(mask.astype(np.float32)))
    assert n == n_expected
    np.testing.assert_array_equal(labels, expected)


def test_half_precision_and_integer_inputs():
    rng = np.random.default_rng(9)
    masks = _random_masks(rng, 3, 8, 9)
    maps32 = rng.random(masks.shape).astype(np.float32) + 0.3 * masks
    half = torch.from_numpy(maps32).to(torch.bfloat16)
    expected = metrics.evaluate(np.arange(3.0), np.array([0, 1, 1]), half.float().numpy(), masks)
    got = metrics.evaluate(torch.arange(3), torch.tensor([0, 1, 1]), half, torch.from_numpy(masks).long())
    assert got == pytest.approx(expected, rel=1e-12)


def test_evaluate_keys_and_values():
    maps, masks = _hand_case()
    scores, labels = np.array([0.9, 0.5]), np.array([1, 0])
    out = metrics.evaluate(scores, labels)
    assert list(out) == list(metrics.IMAGE_METRICS)
    out = metrics.evaluate(scores, labels, maps, masks)
    assert list(out) == [*metrics.IMAGE_METRICS, *metrics.PIXEL_METRICS]
    assert all(isinstance(v, float) for v in out.values())
    assert out["I-AUROC"] == out["I-AP"] == out["I-F1max"] == 1.0
    assert out["AUPRO"] == pytest.approx(2381 / 2880, rel=1e-12)
    assert out["P-AUROC"] == pytest.approx(sklearn_metrics.roc_auc_score(masks.ravel(), maps.ravel()), rel=1e-12)


def test_evaluate_per_class_averages_classes():
    rng = np.random.default_rng(2)
    masks = _random_masks(rng, 9, 10, 11, n_normal=3)
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)
    scores, labels = maps.max((1, 2)), masks.any((1, 2))
    classes = ["screw", "bottle", "screw", "bottle", "bottle", "screw", "bottle", "screw", "screw"]
    labels[[0, 1]] = False
    labels[[7, 8, 4, 6]] = True
    rows = metrics.evaluate_per_class(scores, labels, classes, maps, masks)
    assert list(rows) == ["screw", "bottle", "mean"]
    for name in ("screw", "bottle"):
        idx = [i for i, c in enumerate(classes) if c == name]
        assert rows[name] == pytest.approx(metrics.evaluate(scores[idx], labels[idx], maps[idx], masks[idx]), rel=1e-12)
    for key in (*metrics.IMAGE_METRICS, *metrics.PIXEL_METRICS):
        assert rows["mean"][key] == pytest.approx((rows["screw"][key] + rows["bottle"][key]) / 2, rel=1e-12)
    # each row scores its own images only
    idx = [i for i, c in enumerate(classes) if c == "screw"]
    screw = sklearn_metrics.roc_auc_score(labels[idx], scores[idx])
    assert rows["screw"]["I-AUROC"] == pytest.approx(screw, rel=1e-12)


def test_evaluate_per_class_nan_class_makes_mean_nan():
    scores = np.array([0.1, 0.8, 0.3, 0.4])
    labels = np.array([0, 1, 0, 0])
    rows = metrics.evaluate_per_class(scores, labels, np.array([1, 1, 2, 2]))
    assert rows[1]["I-AUROC"] == 1.0
    assert math.isnan(rows[2]["I-AUROC"])
    assert math.isnan(rows["mean"]["I-AUROC"])


@pytest.mark.filterwarnings("error")
def test_one_class_only_is_nan_without_warnings():
    maps, masks = _hand_case()
    normal = metrics.evaluate(np.array([0.2, 0.4]), np.array([0, 0]), maps, np.zeros_like(masks))
    assert all(math.isnan(normal[k]) for k in ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO"))
    anomalous = metrics.evaluate(np.array([0.2, 0.4]), np.array([1, 1]), maps, np.ones_like(masks))
    assert math.isnan(anomalous["I-AUROC"]) and math.isnan(anomalous["P-AUROC"]) and math.isnan(anomalous["AUPRO"])
    # with positives only, precision is 1 everywhere: AP and F1-max are 1 (sklearn agrees on AP)
    assert anomalous["I-AP"] == anomalous["I-F1max"] == anomalous["P-AP"] == anomalous["P-F1max"] == 1.0
    assert metrics.evaluate(np.array([0.3]), np.array([1]))["I-AP"] == 1.0
    assert math.isnan(metrics.evaluate(np.array([0.3]), np.array([0]))["I-AUROC"])


def _ok():
    maps, masks = _hand_case()
    return {"scores": np.array([0.9, 0.5]), "labels": np.array([1, 0]), "maps": maps, "masks": masks}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"masks": np.zeros((2, 2, 4), bool)},
            ValueError,
            r"masks must have the shape of maps \(2, 2, 5\), got \(2, 2, 4\)",
        ),
        ({"masks": np.full((2, 2, 5), 255, np.uint8)}, ValueError, r"masks must be binary .*got 20 value\(s\).*255"),
        ({"labels": np.array([1, 2])}, ValueError, r"labels must be binary \(bool or 0/1\).*\[2\]"),
        ({"scores": np.array([0.9, np.nan])}, ValueError, r"scores must be finite, got 1 NaN/inf"),
        ({"maps": np.full((2, 2, 5), np.inf)}, ValueError, r"maps must be finite, got 20 NaN/inf"),
        ({"scores": np.zeros((2, 1))}, ValueError, r"scores must be \[N\] \(one score per image\), got a 2-d"),
        ({"labels": np.zeros(())}, ValueError, r"labels must be \[N\].*got a 0-d"),
        ({"maps": np.zeros((2, 10))}, ValueError, r"maps must be \[N, H, W\], got a 2-d tensor of shape \(2, 10\)"),
        ({"masks": np.zeros((2, 2, 5, 1))}, ValueError, r"masks must be \[N, H, W\], got a 4-d"),
        (
            {"scores": np.zeros(0), "labels": np.zeros(0)},
            ValueError,
            r"scores must hold at least one image, got shape \(0,\)",
        ),
        (
            {"maps": np.zeros((2, 0, 5)), "masks": np.zeros((2, 0, 5))},
            ValueError,
            r"maps must be a non-empty \[N, H, W\]",
        ),
        ({"labels": np.array([1, 0, 0])}, ValueError, r"labels must have the shape of scores \(2,\), got \(3,\)"),
        ({"masks": None}, ValueError, r"maps and masks must be given together, got maps but masks=None"),
        ({"maps": None}, ValueError, r"got masks but maps=None"),
        (
            {"maps": np.zeros((3, 2, 5)), "masks": np.zeros((3, 2, 5))},
            ValueError,
            r"maps must hold one map per score \(\[2, H, W\]\), got shape \(3, 2, 5\)",
        ),
        ({"scores": [0.9, 0.5]}, TypeError, r"scores must be a torch.Tensor or numpy.ndarray, got list"),
        ({"scores": np.array([True, False])}, TypeError, r"scores must be real-valued .* got dtype torch.bool"),
        ({"pro_fpr_limit": 0.0}, ValueError, r"pro_fpr_limit must be in \(0, 1\], got 0.0"),
        ({"pro_fpr_limit": 1.5}, ValueError, r"pro_fpr_limit must be in \(0, 1\], got 1.5"),
        ({"pro_fpr_limit": "0.3"}, TypeError, r"pro_fpr_limit must be a float in \(0, 1\], got str"),
    ],
)
def test_evaluate_validation(change, error, match):
    kwargs = {**_ok(), **change}
    with pytest.raises(error, match=match):
        metrics.evaluate(**kwargs)


def test_other_validation():
    maps, masks = _hand_case()
    with pytest.raises(ValueError, match=r"labels must have the shape of scores \(2, 2, 5\), got \(2, 10\)"):
        metrics.auroc(maps, masks.reshape(2, 10))
    with pytest.raises(ValueError, match=r"scores must be a non-empty tensor"):
        metrics.average_precision(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match=r"fpr_limit must be in \(0, 1\], got -0.1"):
        metrics.aupro(maps, masks, fpr_limit=-0.1)
    with pytest.raises(ValueError, match=r"mask must be \[H, W\], got a 3-d"):
        metrics.connected_components(masks)
    with pytest.raises(ValueError, match=r"mask must be binary"):
        metrics.connected_components(np.full((3, 3), 0.5))
    ok = _ok()
    with pytest.raises(ValueError, match=r"classes must hold one class per image \(2\), got 3"):
        metrics.evaluate_per_class(ok["scores"], ok["labels"], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"classes must not contain the name 'mean'"):
        metrics.evaluate_per_class(ok["scores"], ok["labels"], ["a", "mean"])
    with pytest.raises(TypeError, match=r"classes must be a sequence of 2 class names .* got str"):
        metrics.evaluate_per_class(ok["scores"], ok["labels"], "ab")


def test_per_class_metrics_of_a_class_without_normal_images_are_nan_with_a_warning():
    """A class without test/good once printed I-AP 100 beside I-AUROC NaN: all undefined now."""
    scores = np.array([0.1, 0.8, 0.3, 0.4, 0.9])
    labels = np.array([0, 1, 1, 1, 1])
    maps = np.random.default_rng(0).random((5, 4, 4)).astype(np.float32)
    masks = np.zeros((5, 4, 4), bool)
    masks[1:, :2] = True
    masks[4] = True  # class b's last image is defect everywhere; with the others, b still has normal pixels
    with pytest.warns(RuntimeWarning, match="class 'b' has no normal test image: its image metrics are undefined"):
        rows = metrics.evaluate_per_class(scores, labels, ["a", "a", "b", "b", "b"], maps, masks)
    assert all(math.isnan(rows["b"][k]) for k in metrics.IMAGE_METRICS)
    assert all(math.isnan(rows["mean"][k]) for k in metrics.IMAGE_METRICS)
    assert rows["a"]["I-AUROC"] == 1.0 and not math.isnan(rows["b"]["P-AUROC"])
    only_defect = np.ones((5, 4, 4), bool)
    with pytest.warns(RuntimeWarning, match="class '[ab]' has no normal pixel in its masks") as caught:
        rows = metrics.evaluate_per_class(
            scores, np.array([0, 1, 0, 1, 1]), ["a", "a", "b", "b", "b"], maps, only_defect
        )
    assert all(math.isnan(rows[c][k]) for c in "ab" for k in metrics.PIXEL_METRICS)
    assert len(caught) == 2
