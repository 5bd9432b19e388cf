"""Exact cosine top-K reference (the "flat" search): the oracle of every flat search backend.

Letters: M queries, N database tokens, D dims, K neighbours.
Queries and tokens are unit-norm, so the distance 1 - cos(q, t) = 1 - q . t, computed with float32
matmuls. The answer is the K smallest (dist, id) pairs in lexicographic order: ascending distance,
equal distances by ascending token id, also where K cuts a group of equal distances (the tie rule of
every backend, as faiss's and the KMeans assignment's). A query with fewer than K admissible tokens
gets ``idx = -1`` and ``dist = +inf`` in the missing slots. Blockwise over the database, so memory
stays at [M, block + K] whatever N is (faiss's knn_ground_truth pattern).
"""

from __future__ import annotations

import torch

# database rows per block: bounds the [M, block] similarity block
BLOCK = 16384


def lex_order(dist: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Positions [M, C] that sort each row of dist, idx [M, C] by distance, equal distances by id."""
    by_id = torch.argsort(idx, dim=1, stable=True)  # [M, C]
    by_dist = torch.argsort(dist.gather(1, by_id), dim=1, stable=True)
    return by_id.gather(1, by_dist)


def smallest_in_id_order(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Positions [M, k] of the k smallest entries of each row of dist [M, C] (k <= C) whose columns
    are in ascending id order, under the tie rule: sorted by distance, then column, and where the
    k-th distance is shared, the columns of it that come first are the ones kept."""
    vals, pos = torch.topk(dist, k, dim=1, largest=False)  # [M, k]: any members of a tie
    kth = vals[:, k - 1 :]  # [M, 1]
    # rows where topk had to choose among the group at the k-th distance (rare but for exact ties)
    cut = torch.nonzero((dist == kth).sum(dim=1) > (vals == kth).sum(dim=1))[:, 0]
    if cut.numel():
        d = dist[cut]  # [R, C]
        at = d == kth[cut]
        room = k - (d < kth[cut]).sum(dim=1, keepdim=True)  # [R, 1] slots left for that group
        keep = (d < kth[cut]) | (at & (at.cumsum(dim=1) <= room))  # exactly k per row
        pos[cut] = keep.nonzero()[:, 1].view(-1, k)
    pos = pos.sort(dim=1).values  # columns ascending, then a stable sort by distance
    order = torch.argsort(dist.gather(1, pos), dim=1, stable=True)
    return pos.gather(1, order)


def merge_topk(
    dist: torch.Tensor, idx: torch.Tensor, new_dist: torch.Tensor, new_idx: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K smallest (dist, idx) pairs of two candidate sets [M, K1] and [M, K2], in lexicographic order."""
    all_dist = torch.cat([dist, new_dist], dim=1)  # [M, K1 + K2]
    all_idx = torch.cat([idx, new_idx], dim=1)
    pos = lex_order(all_dist, all_idx)[:, :k]
    return all_dist.gather(1, pos), all_idx.gather(1, pos)


def cosine_topk_ref(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    token_group: torch.Tensor | None = None,
    exclude_group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-K nearest tokens by 1 - cos for each query.

    Args:
        queries: [M, D] float32 unit-norm queries.
        tokens: [N, D] float32 unit-norm database tokens.
        k: neighbours per query (>= 1).
        lo, hi: optional [M] int64: query m only sees tokens lo[m] <= n < hi[m] (one class of a
            class-grouped database); default the whole database.
        token_group, exclude_group: optional [N] and [M] int64: query m never sees tokens with
            token_group[n] == exclude_group[m] (leave-one-out by template image; -1 excludes none).

    Returns:
        dist [M, K] float32 ascending 1 - cos (+inf when missing), idx [M, K] int64 (-1 when missing);
        equal distances by ascending id.
    """
    m, n = queries.shape[0], tokens.shape[0]
    dev = queries.device
    best_dist = torch.full((m, k), float("inf"), dtype=torch.float32, device=dev)
    best_idx = torch.full((m, k), -1, dtype=torch.int64, device=dev)
    if m == 0 or n == 0:
        return best_dist, best_idx
    first, last = 0, n
    if lo is not None:
        # only the span that some query may see needs scanning (one class of a grouped database)
        first, last = max(0, int(lo.min())), min(n, int(hi.max()))
    for start in range(first, last, BLOCK):
        stop = min(last, start + BLOCK)
        sim = queries.float() @ tokens[start:stop].float().T  # [M, block]
        dist = 1.0 - sim
        ids = torch.arange(start, stop, device=dev)  # [block]
        admissible = torch.ones_like(dist, dtype=torch.bool)
        if lo is not None:
            admissible &= (ids[None, :] >= lo[:, None]) & (ids[None, :] < hi[:, None])
        if exclude_group is not None:
            admissible &= token_group[start:stop][None, :] != exclude_group[:, None]
        dist = dist.masked_fill(~admissible, float("inf"))
        cand_idx = torch.where(admissible, ids[None, :].expand_as(dist), -1)
        pos = smallest_in_id_order(dist, min(k, stop - start))  # [M, take]
        best_dist, best_idx = merge_topk(best_dist, best_idx, dist.gather(1, pos), cand_idx.gather(1, pos), k)
    # an inadmissible token (+inf) only fills slots no admissible one reaches
    missing = torch.isinf(best_dist) | (best_idx < 0)
    return best_dist.masked_fill(missing, float("inf")), best_idx.masked_fill(missing, -1)
