"""Inverted-list (IVF) top-K reference: the oracle of the hierarchical instance search.

Letters: M queries, P probed lists per query, N tokens, D dims, K neighbours.
Tokens are stored grouped by list (CSR): list l owns tokens list_offsets[l] .. list_offsets[l+1]-1.
Each query searches the union of its P probed lists and keeps one global top-K by 1 - cos
(no per-list quota): the K smallest (dist, id) pairs in lexicographic order, so equal distances go
to the smaller token id (the tie rule of ``raid_fast.ref.similarity``); missing slots are
``idx = -1``, ``dist = +inf``. Written cluster by cluster: the queries that probe a list are scanned
against it together.
"""

from __future__ import annotations

import torch

from raid_fast.ref.similarity import lex_order, smallest_in_id_order


def ivf_topk_ref(
    queries: torch.Tensor,
    probes: torch.Tensor,
    list_offsets: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    token_group: torch.Tensor | None = None,
    exclude_group: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K tokens over the union of each query's probed lists.

    Args:
        queries: [M, D] float32 unit-norm.
        probes: [M, P] int64 list ids, distinct per row; -1 marks an unused slot.
        list_offsets: [L + 1] int64 CSR offsets of the lists into ``tokens``.
        tokens: [N, D] float32 unit-norm, grouped by list.
        k: neighbours per query.
        token_group, exclude_group: optional [N] / [M] int64: query m never sees tokens with
            token_group[n] == exclude_group[m] (-1 excludes none).

    Returns:
        dist [M, K] float32 ascending 1 - cos, idx [M, K] int64 global token ids (equal distances
        by ascending id).
    """
    m, p = probes.shape
    dev = queries.device
    if p == 0:
        return (
            torch.full((m, k), float("inf"), dtype=torch.float32, device=dev),
            torch.full((m, k), -1, dtype=torch.int64, device=dev),
        )
    part_dist = torch.full((m, p, k), float("inf"), dtype=torch.float32, device=dev)  # [M, P, K]
    part_idx = torch.full((m, p, k), -1, dtype=torch.int64, device=dev)
    offsets = list_offsets.tolist()
    for lst in torch.unique(probes[probes >= 0]).tolist():
        lo, hi = offsets[lst], offsets[lst + 1]
        if hi == lo:
            continue
        qm, slot = torch.nonzero(probes == lst, as_tuple=True)  # the queries probing this list
        dist = 1.0 - queries[qm].float() @ tokens[lo:hi].float().T  # [Mq, n_list]
        ids = torch.arange(lo, hi, device=dev).expand_as(dist)
        if exclude_group is not None:
            banned = token_group[lo:hi][None, :] == exclude_group[qm][:, None]
            dist = dist.masked_fill(banned, float("inf"))
            ids = torch.where(banned, -1, ids)
        take = min(k, hi - lo)
        pos = smallest_in_id_order(dist, take)  # [Mq, take]: the columns are the list's ids in order
        part_dist[qm, slot, :take] = dist.gather(1, pos)
        part_idx[qm, slot, :take] = ids.gather(1, pos)
    all_dist, all_idx = part_dist.view(m, p * k), part_idx.view(m, p * k)
    pos = lex_order(all_dist, all_idx)[:, :k]  # [M, K]
    dist, idx = all_dist.gather(1, pos), all_idx.gather(1, pos)
    idx = torch.where(torch.isinf(dist), -1, idx)
    return dist, idx
