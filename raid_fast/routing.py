"""Routing of hierarchical retrieval: which class an image belongs to and which semantic
prototypes each of its tokens probes.

Letters: B images, L tokens per image, D dims, C classes, S prototype slots per class, P probed
prototypes per token (``nprobe``).

Class by argmax cosine of the image's CLS token to the class prototypes (or given ``class_ids``);
per token, the top-P prototypes of that class by cosine (the top-1 is the guidance g_s). The
``probe_prototypes`` op does both in one launch on triton, since at batch 1 on a GPU launches are
the cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from raid_fast import _checks, _dispatch

if TYPE_CHECKING:
    from raid_fast.database import TokenDatabase


def probe_bias(db: TokenDatabase) -> tuple[torch.Tensor, int]:
    """``(bias [C, S] float32 on the database's device, min_used)``: 0 for the prototype slots a
    class uses and -inf for its empty ones (added to prototype scores, it keeps them out of the
    top-P), and the smallest ``n_semantic``; derived once when the database is made."""
    return db.probe_bias, db.min_used


def check_query_cls(db: TokenDatabase, query_cls, b: int) -> torch.Tensor:
    """Validated CLS tokens [B, D] as float32 on the database's device: finite, nonzero rows."""
    q = _checks.as_tensor("query_cls", query_cls)
    _checks.check_floating("query_cls", q)
    _checks.check_ndim("query_cls", q, (2,), f"[{b}, {db.dim}]")
    if q.shape[0] != b:
        msg = f"query_cls must be [{b}, {db.dim}] (one per image), got {tuple(q.shape)}"
        raise ValueError(msg)
    if q.shape[1] != db.dim:
        msg = f"query_cls must have D={db.dim} like the database, got shape {tuple(q.shape)}"
        raise ValueError(msg)
    _checks.check_same_device(query_cls=q, database=db.class_prototypes)
    # a NaN or zero CLS token has no nearest class: argmax would silently route it to class 0
    _checks.check_directions("query_cls", q, row="image")
    return q.float()


def check_class_ids(db: TokenDatabase, class_ids, b: int) -> torch.Tensor:
    """Validated class ids [B] int64 on the database's device (a scalar applies to every image)."""
    ids = _checks.as_tensor("class_ids", class_ids)
    if ids.dim() == 0:
        ids = ids.expand(b)
    _checks.check_ndim("class_ids", ids, (1,), f"[{b}]")
    if ids.shape[0] != b or ids.is_floating_point():
        msg = f"class_ids must be [{b}] integers (one per image), got {tuple(ids.shape)} {ids.dtype}"
        raise ValueError(msg)
    ids = ids.to(device=db.device, dtype=torch.int64)
    # one host sync for both bounds, eager only
    lo_hi = torch.stack(torch.aminmax(ids)).tolist() if b and _checks.data_checks() else [0, 0]
    if b and (lo_hi[0] < 0 or lo_hi[1] >= db.n_classes):
        msg = f"class_ids must be in [0, {db.n_classes}), got {ids.tolist()[:8]}"
        raise ValueError(msg)
    return ids


def resolve(
    class_ids, query_cls, db: TokenDatabase, queries: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(class ids [B] int64, or None) and (validated CLS tokens [B, D] to route by, or None): at most
    one is set; neither when flat retrieval must infer the class from the neighbours. A database
    built without CLS tokens routes by the queries' mean patch token [B, L, D] -> [B, D], as it was built."""
    b = queries.shape[0]
    if query_cls is None and class_ids is None and db.n_classes > 1 and db.params.get("cls_source") == "mean_patch":
        query_cls = queries.mean(dim=1)
    if class_ids is not None:
        return check_class_ids(db, class_ids, b), None
    if query_cls is not None:
        return None, check_query_cls(db, query_cls, b)
    if db.n_classes == 1:
        return torch.zeros(b, dtype=torch.int64, device=db.device), None
    return None, None


def probe(
    q: torch.Tensor,
    db: TokenDatabase,
    class_ids: torch.Tensor | None,
    query_cls: torch.Tensor | None,
    p: int,
    backend: str | None,
):
    """(class ids [B], qn [B * L, D] unit-norm queries, probes [B, L, P] global list ids or -1,
    proto [B, L, D] top-1 prototypes), routing by ``query_cls`` when ``class_ids`` is None."""
    bias, min_used = probe_bias(db)  # [C, S]
    # a backend asked for the searches (cpp has no probe) is a preference for this step
    return _dispatch.call(
        "probe_prototypes",
        q,
        db.semantic_prototypes,
        bias,
        class_ids,
        p,
        min_used,
        query_cls,
        db.class_prototypes,
        prefer=backend,
    )
