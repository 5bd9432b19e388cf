"""The argument spec of every op, declared once.

Each op has a ``torch.library`` schema in :data:`SCHEMAS` (argument names, types, defaults and
results) and a fake in :data:`FAKES` (its outputs' shapes and dtypes from the inputs' shapes alone,
never their values, for tracing). The dispatcher binds calls by the schema's names (``supports`` checks read ``args.queries``, ``args.k``, ...),
every backend implements exactly this signature, and :mod:`raid_fast.ops.library` registers each op
as the custom op ``raid_fast::<name>`` so that ``torch.compile`` and ``torch.export`` see it.

Letters: M queries, N tokens, D dims, K neighbours, P probed lists, B images, L = H * W tokens per
image, C classes, S prototype slots per class, G groups, k centroids per group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

SCHEMAS: dict[str, str] = {
    # exact top-K by 1 - q . t: dist [M, K] ascending, idx [M, K] (-1 / +inf when missing);
    # unit_norm=False allows any norms (knn's inner-product and L2 searches)
    "cosine_topk": (
        "(Tensor queries, Tensor tokens, int k, Tensor? lo=None, Tensor? hi=None, Tensor? token_group=None, "
        "Tensor? exclude_group=None, bool unit_norm=True) -> (Tensor, Tensor)"
    ),
    # top-K over the union of each query's probed CSR lists: dist [M, K], idx [M, K]
    "ivf_topk": (
        "(Tensor queries, Tensor probes, Tensor list_offsets, Tensor tokens, int k, Tensor? token_group=None, "
        "Tensor? exclude_group=None) -> (Tensor, Tensor)"
    ),
    # ivf_topk of M = b * h * w queries and its cost volume [B, K, H, W]
    "ivf_topk_cost_volume": (
        "(Tensor queries, Tensor probes, Tensor list_offsets, Tensor tokens, int k, Tensor? token_group, "
        "Tensor? exclude_group, int b, int h, int w, float pad_cost=1.0) -> (Tensor, Tensor, Tensor)"
    ),
    # [B, L, K] distances -> [B, K, H, W] volume, +inf -> pad_cost
    "cost_volume": "(Tensor dist, int h, int w, float pad_cost=1.0) -> Tensor",
    # class ids [B], unit-norm queries [B * L, D], probes [B, L, P], top-1 prototypes [B, L, D]
    "probe_prototypes": (
        "(Tensor queries, Tensor semantic_prototypes, Tensor bias, Tensor? class_ids, int p, int min_used=0, "
        "Tensor? query_cls=None, Tensor? class_prototypes=None) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    # nearest centroid of each point within its group: dist [N], idx [N]
    "kmeans_assign": "(Tensor x, Tensor offsets, int max_size, Tensor centroids) -> (Tensor, Tensor)",
    # centroids [G, k, D] and counts [G, k] of an assignment
    "kmeans_update": (
        "(Tensor x, Tensor offsets, int max_size, Tensor idx, int k, bool spherical) -> (Tensor, Tensor)"
    ),
    # one Lloyd iteration: dist [N], idx [N], new centroids [G, k, D], counts [G, k]
    "kmeans_step": (
        "(Tensor x, Tensor offsets, int max_size, Tensor centroids, bool spherical) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    # k-means++ seeding driven by uniforms [G, k]: centroids [G, k, D], chosen point ids [G, k]
    "kmeans_plusplus": "(Tensor x, Tensor offsets, int max_size, int k, Tensor uniforms) -> (Tensor, Tensor)",
}


def _f32(t: torch.Tensor, *shape: int) -> torch.Tensor:
    return t.new_empty(shape, dtype=torch.float32)


def _i64(t: torch.Tensor, *shape: int) -> torch.Tensor:
    return t.new_empty(shape, dtype=torch.int64)


def _search_fake(queries, k):
    m = queries.shape[0]
    return _f32(queries, m, k), _i64(queries, m, k)


def _kmeans_groups(offsets) -> int:
    return offsets.shape[0] - 1


FAKES: dict[str, Callable[..., Any]] = {
    "cosine_topk": lambda queries, tokens, k, *rest: _search_fake(queries, k),
    "ivf_topk": lambda queries, probes, list_offsets, tokens, k, *rest: _search_fake(queries, k),
    "ivf_topk_cost_volume": lambda queries, probes, list_offsets, tokens, k, tg, eg, b, h, w, pad=1.0: (
        *_search_fake(queries, k),
        _f32(queries, b, k, h, w),
    ),
    "cost_volume": lambda dist, h, w, pad=1.0: _f32(dist, dist.shape[0], dist.shape[2], h, w),
    "probe_prototypes": lambda queries, sem, bias, class_ids, p, *rest: (
        _i64(queries, queries.shape[0]),
        _f32(queries, queries.shape[0] * queries.shape[1], queries.shape[2]),
        _i64(queries, queries.shape[0], queries.shape[1], p),
        _f32(queries, *queries.shape),
    ),
    "kmeans_assign": lambda x, offsets, max_size, centroids: (_f32(x, x.shape[0]), _i64(x, x.shape[0])),
    "kmeans_update": lambda x, offsets, max_size, idx, k, spherical: (
        _f32(x, _kmeans_groups(offsets), k, x.shape[1]),
        _i64(x, _kmeans_groups(offsets), k),
    ),
    "kmeans_step": lambda x, offsets, max_size, centroids, spherical: (
        _f32(x, x.shape[0]),
        _i64(x, x.shape[0]),
        _f32(x, *centroids.shape),
        _i64(x, *centroids.shape[:2]),
    ),
    "kmeans_plusplus": lambda x, offsets, max_size, k, uniforms: (
        _f32(x, _kmeans_groups(offsets), k, x.shape[1]),
        _i64(x, _kmeans_groups(offsets), k),
    ),
}
