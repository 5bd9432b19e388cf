"""Reference of the hierarchical retrieval's first step: route each image to a class (unless given),
normalise the query tokens, score them against the semantic prototypes of their image's class, keep
the top-P as probes.

Letters: B images, L tokens per image, D dims, C classes, S prototype slots per class, P probes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def probe_prototypes_ref(
    queries: torch.Tensor,
    semantic_prototypes: torch.Tensor,
    bias: torch.Tensor,
    class_ids: torch.Tensor | None,
    p: int,
    min_used: int = 0,
    query_cls: torch.Tensor | None = None,
    class_prototypes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-P semantic prototypes of each query token, within its image's class.

    Args:
        queries: [B, L, D] float32 query tokens (any norm, any strides).
        semantic_prototypes: [C, S, D] float32 unit-norm prototypes (unused slots zero).
        bias: [C, S] float32, 0 for the slots a class uses and -inf for its empty ones.
        class_ids: [B] int64 class of each image, or None to route by ``query_cls``.
        p: probes per token, 1 <= p <= S.
        min_used: a lower bound on the slots every class uses: when p <= min_used no probe can land
            on an unused slot and the -1 masking is skipped (two launches fewer per call).
        query_cls: [B, D] float32 CLS tokens; with ``class_ids`` None each image takes the class
            whose prototype is nearest by cosine (``TokenDatabase.classify``, first index on ties).
        class_prototypes: [C, D] unit-norm class prototypes (for the routing).

    Returns:
        class_ids [B] (given or routed), qn [B * L, D] the unit-norm queries (``F.normalize``), probes [B, L, P] int64 global list ids
        ``class * S + slot`` in descending score order (-1 for a slot the class does not use; ties in
        unspecified order), proto [B, L, D] the top-1 prototype (the guidance vector).
    """
    b, n_pos, dim = queries.shape
    s = semantic_prototypes.shape[1]
    if class_ids is None:
        class_ids = (F.normalize(query_cls.float(), dim=1) @ class_prototypes.T).argmax(dim=1)  # [B]
    qn = F.normalize(queries.float(), dim=-1)  # [B, L, D]
    # index_select rather than tensor[...] indexing: the same kernels, a fraction of the host time
    sem = torch.index_select(semantic_prototypes, 0, class_ids)  # [B, S, D]
    sims = torch.baddbmm(torch.index_select(bias, 0, class_ids).unsqueeze(1), qn, sem.transpose(1, 2))  # [B, L, S]
    top, j = torch.topk(sims, p, dim=-1)  # [B, L, P]
    probes = j + (class_ids * s).view(b, 1, 1)
    if p > min_used:
        probes = probes.masked_fill(torch.isinf(top), -1)
    # every class has at least one prototype, so the top-1 probe is always a real one
    flat_protos = semantic_prototypes.reshape(-1, dim)  # [C * S, D]
    proto = torch.index_select(flat_protos, 0, probes.select(-1, 0).reshape(-1)).view(b, n_pos, dim)
    return class_ids, qn.reshape(b * n_pos, dim), probes, proto
