"""Anomaly-detection metrics: image and pixel AUROC / AP / F1-max and the MVTec AD AUPRO.

Letters: N images, H x W pixels per map. Image metrics take ``scores [N]`` and ``labels [N]``
(0 normal, 1 anomalous). Pixel metrics pool every pixel of ``maps [N, H, W]`` against
``masks [N, H, W]`` (1 = defect), as the MVTec AD evaluation and the RAID authors' code do.
``evaluate_per_class`` runs both per class and averages the classes (the paper's protocol).

Ties follow scikit-learn: all samples with one score form one threshold step, so ``auroc`` equals
``roc_auc_score``, ``average_precision`` equals ``average_precision_score`` and ``f1_max`` is the
maximum of 2PR / (P + R) over the points of ``precision_recall_curve``.

How: everything runs on the CPU in numpy (torch tensors on any device and numpy arrays are
accepted and copied to host memory once). The normal and the anomalous scores are sorted
separately, values only and in the input's own precision (float32 maps stay float32, which keeps
order and ties exact), and every threshold is read off with ``searchsorted``, in chunks. Memory is
therefore linear in the number of pixels, about one extra copy of the maps plus a bool mask, with
no structure per threshold and no argsort over all pixels (2,000 maps of 256 x 256 are 131 M
pixels: about 0.5 GiB of float32 scores beyond the inputs). Counts are int64, sums float64.

Undefined values are NaN, never an exception: AUROC with only one class present; AP and F1-max
with no positive sample (with no negative sample both are 1, as in scikit-learn); AUPRO with no
anomaly region or no normal pixel.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from raid_fast import _checks

IMAGE_METRICS = ("I-AUROC", "I-AP", "I-F1max")
PIXEL_METRICS = ("P-AUROC", "P-AP", "P-F1max", "AUPRO")

# thresholds handled per numpy call; bounds the int64/float64 temporaries, not the result
_CHUNK = 1 << 20

_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve, ties as in ``sklearn.metrics.roc_auc_score``.

    Computed as the Mann-Whitney statistic P(s+ > s-) + P(s+ = s-) / 2, which is exactly the
    trapezoid area of the ROC curve whose steps are the distinct scores.

    Args:
        scores: [...] real scores, higher = more anomalous (torch tensor or numpy array). Any
            shape; all elements are pooled (pass maps [N, H, W] for the pixel-level value).
        labels: same shape, binary (bool or 0/1), 1 = anomalous.

    Returns:
        The AUROC in [0, 1]; NaN when ``labels`` holds only one class.
    """
    neg, pos = _split_sorted(*_binary_inputs(scores, labels))
    return _rank_metrics(neg, pos)[0]


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision, ties as in ``sklearn.metrics.average_precision_score``.

    AP = sum over distinct thresholds t of (R(t) - R(t_prev)) * P(t), precision and recall
    counting every sample with score >= t.

    Args:
        scores: [...] real scores, any shape, pooled.
        labels: same shape, binary, 1 = anomalous (the positive class).

    Returns:
        The AP in [0, 1]; NaN when there is no positive sample.
    """
    neg, pos = _split_sorted(*_binary_inputs(scores, labels))
    return _rank_metrics(neg, pos)[1]


def f1_max(scores: Any, labels: Any) -> float:
    """Best F1 = 2PR / (P + R) over all distinct thresholds (the ``precision_recall_curve`` points).

    Args:
        scores: [...] real scores, any shape, pooled.
        labels: same shape, binary, 1 = anomalous.

    Returns:
        The maximal F1 in [0, 1]; NaN when there is no positive sample.
    """
    neg, pos = _split_sorted(*_binary_inputs(scores, labels))
    return _rank_metrics(neg, pos)[2]


def aupro(maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve, as the MVTec AD evaluation defines it.

    Regions are the 8-connected components of each ground-truth mask. For a threshold t,
    PRO(t) = mean over all regions of (pixels of the region with map >= t) / (region area), and
    FPR(t) = (normal pixels with map >= t) / (all normal pixels), pooled over every image; images
    without a region only add normal pixels. Distinct map values are the thresholds (ties form
    one step), the curve runs from (0, 0) through these points to (1, 1), is integrated with the
    trapezoid rule from FPR 0 to ``fpr_limit`` (interpolated linearly at exactly ``fpr_limit``)
    and divided by ``fpr_limit``.

    Args:
        maps: [N, H, W] real anomaly maps.
        masks: [N, H, W] binary ground truth (bool or 0/1), 1 = defect.
        fpr_limit: upper FPR bound of the integral, in (0, 1]; 0.3 is the standard.

    Returns:
        AUPRO in [0, 1]. NaN when the masks hold no region at all (PRO undefined) or no normal
        pixel (FPR undefined).
    """
    limit = _check_limit("fpr_limit", fpr_limit)
    m, g = _pixel_inputs(maps, masks)
    return _pixel_metrics(m, g, limit, rank=False)["AUPRO"]


def connected_components(mask: Any) -> tuple[np.ndarray, int]:
    """8-connected components of one binary mask (``scipy.ndimage.label`` semantics).

    Components are numbered 1..n in raster order of their first pixel.

    Args:
        mask: [H, W] binary mask (bool or 0/1).

    Returns:
        ``(labels, n)``: labels [H, W] int32, 0 on background and 1..n on the components; n the
        number of components.
    """
    t = _checks.as_tensor("mask", mask)
    _checks.check_ndim("mask", t, (2,), "[H, W]")
    return _components(_binary_host("mask", t))


def evaluate(
    scores: Any,
    labels: Any,
    maps: Any | None = None,
    masks: Any | None = None,
    pro_fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All image metrics, and the pixel metrics when maps and masks are given.

    Args:
        scores: [N] image anomaly scores, higher = more anomalous.
        labels: [N] binary image labels (0 normal, 1 anomalous).
        maps: optional [N, H, W] anomaly maps of the same images (pixels pooled over all N).
        masks: [N, H, W] binary ground-truth masks; required together with ``maps``.
        pro_fpr_limit: FPR limit of AUPRO, in (0, 1].

    Returns:
        ``{"I-AUROC", "I-AP", "I-F1max"}`` and, with maps, ``{"P-AUROC", "P-AP", "P-F1max",
        "AUPRO"}`` as floats; undefined values are NaN (see the module docstring).

    Example:
        >>> scores = np.array([0.1, 0.9, 0.4]); labels = np.array([0, 1, 1])
        >>> maps = np.random.rand(3, 8, 8).astype(np.float32); masks = maps > 0.9
        >>> evaluate(scores, labels, maps, masks)["I-AUROC"]
        1.0
    """
    s, y, m, g, limit = _evaluate_inputs(scores, labels, maps, masks, pro_fpr_limit)
    return _evaluate_host(s, y, m, g, limit)


def evaluate_per_class(
    scores: Any,
    labels: Any,
    classes: Sequence[Hashable],
    maps: Any | None = None,
    masks: Any | None = None,
    pro_fpr_limit: float = 0.3,
) -> dict[Hashable, dict[str, float]]:
    """``evaluate`` on each class's images, then the plain mean over classes.

    This is the paper's protocol: pixels are pooled within a class only, and each class weighs the
    same in the mean whatever its number of test images.

    Args:
        scores: [N] image anomaly scores.
        labels: [N] binary image labels.
        classes: N class names (or ids), one per image, e.g. the true category of each test image.
        maps: optional [N, H, W] anomaly maps.
        masks: [N, H, W] binary masks, required together with ``maps``.
        pro_fpr_limit: FPR limit of AUPRO, in (0, 1].

    Returns:
        ``{class: metrics}`` in order of first appearance, then ``"mean"``: the mean of each metric
        over the classes. A class needs normal and anomalous images to be evaluated: without both,
        all its image metrics are NaN (not the AP of 1 that positives alone give), and without
        both normal and defect pixels, all its pixel metrics are; each such class is named in a
        ``RuntimeWarning``. A metric that is NaN for some class makes its mean NaN too, so an
        incomplete average is never reported as if it covered every class.
    """
    s, y, m, g, limit = _evaluate_inputs(scores, labels, maps, masks, pro_fpr_limit)
    names = _class_names(classes, s.shape[0])
    rows: dict[Hashable, dict[str, float]] = {}
    for name in dict.fromkeys(names):
        idx = np.flatnonzero([c == name for c in names])
        row = _evaluate_host(s[idx], y[idx], None if m is None else m[idx], None if g is None else g[idx], limit)
        lacking = [kind for kind, v in (("normal", False), ("anomalous", True)) if not (y[idx] == v).any()]
        if lacking:
            row.update(dict.fromkeys(IMAGE_METRICS, math.nan))
            warnings.warn(
                f"class {name!r} has no {' and no '.join(lacking)} test image: its image metrics are undefined (NaN)",
                RuntimeWarning,
                stacklevel=2,
            )
        if g is not None and not (g[idx].any() and not g[idx].all()):
            kind = "defect" if not g[idx].any() else "normal"
            row.update(dict.fromkeys(PIXEL_METRICS, math.nan))
            if not lacking:
                warnings.warn(
                    f"class {name!r} has no {kind} pixel in its masks: its pixel metrics are undefined (NaN)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        rows[name] = row
    keys = next(iter(rows.values())).keys()
    rows["mean"] = {k: float(np.mean([row[k] for row in rows.values()])) for k in keys}
    return rows


def _evaluate_host(
    s: np.ndarray, y: np.ndarray, m: np.ndarray | None, g: np.ndarray | None, limit: float
) -> dict[str, float]:
    out = dict(zip(IMAGE_METRICS, _rank_metrics(*_split_sorted(s, y))))
    if m is not None:
        out.update(_pixel_metrics(m, g, limit, rank=True))
    return out


def _pixel_metrics(maps: np.ndarray, masks: np.ndarray, limit: float, rank: bool) -> dict[str, float]:
    """Pixel metrics from validated host arrays maps [N, H, W] and bool masks [N, H, W]."""
    flat = maps.reshape(-1)
    fg = masks.reshape(-1)
    neg = flat[~fg]
    neg.sort()
    weights, n_regions = _region_weights(masks)
    pos = flat[fg]
    # the per-pixel region weights must follow their scores through the sort
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    weights = weights[order]
    out = dict(zip(PIXEL_METRICS[:3], _rank_metrics(neg, pos))) if rank else {}
    out["AUPRO"] = _pro_area(neg, pos, weights, n_regions, limit)
    return out


def _rank_metrics(neg: np.ndarray, pos: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, AP, F1-max) from the sorted (ascending) negative and positive scores."""
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0:
        return math.nan, math.nan, math.nan
    # twice the Mann-Whitney U, an exact integer: every tie counts 1/2
    two_u = 0
    ap_sum = 0.0
    best_f1 = 0.0
    # only thresholds at positive scores matter: recall moves only there (AP), and F1 at fixed tp
    # is best at the highest threshold that reaches it, which is a positive score
    for t in _unique_sorted(pos):
        pos_lo = np.searchsorted(pos, t, "left")
        count = np.searchsorted(pos, t, "right") - pos_lo
        tp = n_pos - pos_lo
        neg_lo = np.searchsorted(neg, t, "left")
        fp = n_neg - neg_lo
        two_u += int(np.dot(count, neg_lo + np.searchsorted(neg, t, "right")))
        ap_sum += float(np.dot(count, tp / (tp + fp)))
        best_f1 = max(best_f1, float(np.max(2.0 * tp / (tp + fp + n_pos))))
    roc = two_u / (2.0 * n_pos * n_neg) if n_neg else math.nan
    return roc, ap_sum / n_pos, best_f1


def _pro_area(neg: np.ndarray, pos: np.ndarray, weights: np.ndarray, n_regions: int, limit: float) -> float:
    """Normalised PRO-curve area up to FPR ``limit``.

    Args:
        neg: [n_neg] sorted scores of the normal pixels.
        pos: [n_pos] sorted scores of the region pixels.
        weights: [n_pos] 1 / area of each region pixel's region, in the order of ``pos``.
        n_regions: number of regions over all images.
        limit: FPR limit in (0, 1].
    """
    n_neg = neg.size
    if n_regions == 0 or n_neg == 0:
        return math.nan
    # suffix[i]: overlap mass of pos[i:], so the PRO above any threshold is one lookup
    suffix = np.zeros(pos.size + 1)
    suffix[:-1] = np.cumsum(weights[::-1])[::-1]
    # a distinct normal score t moves the curve from (fpr(> t), pro(> t)) to (fpr(>= t), pro(>= t)),
    # in one segment that also takes in the region pixels tied at t; the segments of all other
    # thresholds are vertical and add no area. only the top normal scores reach fpr <= limit: start
    # at the tie group of the one that crosses it
    need = min(n_neg, math.ceil(limit * n_neg) + 1)
    start = int(np.searchsorted(neg, neg[n_neg - need], "left"))
    area = 0.0
    for t in _unique_sorted(neg, start):
        f0 = (n_neg - np.searchsorted(neg, t, "right")) / n_neg
        f1 = (n_neg - np.searchsorted(neg, t, "left")) / n_neg
        y0 = suffix[np.searchsorted(pos, t, "right")] / n_regions
        y1 = suffix[np.searchsorted(pos, t, "left")] / n_regions
        full = f1 <= limit
        area += float(np.sum(0.5 * (y0[full] + y1[full]) * (f1[full] - f0[full])))
        # the one segment that crosses the limit: interpolate pro at exactly fpr = limit
        cut = (f0 < limit) & ~full
        if cut.any():
            dx = limit - f0[cut]
            y_lim = y0[cut] + (y1[cut] - y0[cut]) * dx / (f1[cut] - f0[cut])
            area += float(np.sum(0.5 * (y0[cut] + y_lim) * dx))
    return area / limit


def _unique_sorted(x: np.ndarray, start: int = 0):
    """Yields the distinct values of the sorted ``x[start:]`` in chunks; ``x[start]`` must begin a tie group."""
    for lo in range(start, x.size, _CHUNK):
        seg = x[lo : lo + _CHUNK]
        keep = np.empty(seg.size, dtype=bool)
        # a value that continues a tie group from the previous chunk was yielded there
        keep[0] = lo == start or x[lo] != x[lo - 1]
        np.not_equal(seg[1:], seg[:-1], out=keep[1:])
        values = seg[keep]
        # a chunk inside one long tie group has nothing new
        if values.size:
            yield values


def _split_sorted(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = scores.reshape(-1)
    fg = positive.reshape(-1)
    neg = flat[~fg]
    neg.sort()
    pos = flat[fg]
    pos.sort()
    return neg, pos


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """1 / region area for every defect pixel of masks [N, H, W], in C order, and the region count."""
    parts = []
    n_regions = 0
    for i in np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)):
        labels, n = _components(masks[i])
        inv_area = 1.0 / np.maximum(np.bincount(labels.reshape(-1), minlength=n + 1), 1)
        parts.append(inv_area[labels[masks[i]]])
        n_regions += n
    return (np.concatenate(parts) if parts else np.zeros(0)), n_regions


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(mask, structure=_EIGHT_NEIGHBOURS)
    return labels.astype(np.int32, copy=False), int(n)


def _host_scores(name: str, t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bool or t.is_complex():
        msg = f"{name} must be real-valued (floating point or integer), got dtype {t.dtype}"
        raise TypeError(msg)
    if t.is_floating_point():
        _checks.check_finite(name, t)
    t = t.detach().cpu()
    # numpy has no bfloat16; float32 holds every half value exactly, so order and ties are kept
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.numpy()


def _binary_host(name: str, t: torch.Tensor) -> np.ndarray:
    if t.dtype != torch.bool:
        if t.is_complex():
            msg = f"{name} must be binary (bool or 0/1), got dtype {t.dtype}"
            raise TypeError(msg)
        bad = ~((t == 0) | (t == 1))
        n_bad = int(bad.sum())
        if n_bad:
            examples = torch.unique(t[bad].detach().cpu())[:5].tolist()
            msg = (
                f"{name} must be binary (bool or 0/1), got {n_bad} value(s) outside {{0, 1}}, e.g. {examples} "
                f"(binarise first, e.g. mask > 127 for 0/255 masks)"
            )
            raise ValueError(msg)
        t = t != 0
    return t.detach().cpu().numpy()


def _binary_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _checks.as_tensor("scores", scores)
    y = _checks.as_tensor("labels", labels)
    if s.dim() == 0 or s.numel() == 0:
        msg = f"scores must be a non-empty tensor of at least one dimension, got shape {tuple(s.shape)}"
        raise ValueError(msg)
    if y.shape != s.shape:
        msg = f"labels must have the shape of scores {tuple(s.shape)}, got {tuple(y.shape)}"
        raise ValueError(msg)
    return _host_scores("scores", s), _binary_host("labels", y)


def _image_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _checks.as_tensor("scores", scores)
    y = _checks.as_tensor("labels", labels)
    _checks.check_ndim("scores", s, (1,), "[N] (one score per image)")
    _checks.check_ndim("labels", y, (1,), "[N] (one label per image)")
    if s.shape[0] == 0:
        msg = "scores must hold at least one image, got shape (0,)"
        raise ValueError(msg)
    return _binary_inputs(s, y)


def _pixel_inputs(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _checks.as_tensor("maps", maps)
    g = _checks.as_tensor("masks", masks)
    _checks.check_ndim("maps", m, (3,), "[N, H, W]")
    _checks.check_ndim("masks", g, (3,), "[N, H, W]")
    if m.numel() == 0:
        msg = f"maps must be a non-empty [N, H, W] tensor, got shape {tuple(m.shape)}"
        raise ValueError(msg)
    if g.shape != m.shape:
        msg = f"masks must have the shape of maps {tuple(m.shape)}, got {tuple(g.shape)}"
        raise ValueError(msg)
    return _host_scores("maps", m), _binary_host("masks", g)


def _evaluate_inputs(scores: Any, labels: Any, maps: Any, masks: Any, limit: Any):
    s, y = _image_inputs(scores, labels)
    if (maps is None) != (masks is None):
        given, missing = ("maps", "masks") if masks is None else ("masks", "maps")
        msg = f"maps and masks must be given together, got {given} but {missing}=None"
        raise ValueError(msg)
    m = g = None
    if maps is not None:
        m, g = _pixel_inputs(maps, masks)
        if m.shape[0] != s.shape[0]:
            msg = f"maps must hold one map per score ([{s.shape[0]}, H, W]), got shape {tuple(m.shape)}"
            raise ValueError(msg)
    return s, y, m, g, _check_limit("pro_fpr_limit", limit)


def _check_limit(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        msg = f"{name} must be a float in (0, 1], got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    value = float(value)
    if not 0.0 < value <= 1.0:
        msg = f"{name} must be in (0, 1], got {value!r}"
        raise ValueError(msg)
    return value


def _class_names(classes: Any, n: int) -> list:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, np.ndarray, torch.Tensor)):
        msg = f"classes must be a sequence of {n} class names (one per image), got {type(classes).__name__}"
        raise TypeError(msg)
    names = classes.tolist() if isinstance(classes, (np.ndarray, torch.Tensor)) else list(classes)
    if len(names) != n:
        msg = f"classes must hold one class per image ({n}), got {len(names)}"
        raise ValueError(msg)
    if "mean" in names:
        msg = "classes must not contain the name 'mean', which is reserved for the average row"
        raise ValueError(msg)
    return names
