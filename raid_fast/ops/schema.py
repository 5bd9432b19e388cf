"""The argument spec of every op, declared once.

Each entry is a ``torch.library`` schema (argument names, types, defaults and results). The
dispatcher binds calls by these names (``supports`` checks read ``args.queries``, ``args.k``, ...),
every backend implements exactly this signature, and :mod:`raid_fast.ops.library` registers each op
as the custom op ``raid_fast::<name>`` so that ``torch.compile`` and ``torch.export`` see it.

Letters: M queries, N tokens, D dims, K neighbours, P probed lists, B images, L = H * W tokens per
image, C classes, S prototype slots per class, G groups, k centroids per group.
"""

from __future__ import annotations

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
