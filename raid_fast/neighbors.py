"""Exact k-nearest-neighbour search over plain vectors, with faiss's conventions: ``knn``.

Letters: M queries (per batch), B batches, N bank vectors, D dims, K neighbours.

Metrics (``METRICS``):

- ``"l2"``: squared Euclidean distance ``||q - x||^2``, ascending: what faiss's ``IndexFlatL2`` and
  PatchCore report (``sqrt=True`` gives the Euclidean distance);
- ``"ip"``: inner product ``q . x``, descending (faiss's ``IndexFlatIP``);
- ``"cosine"``: ``1 - cos(q, x)``, ascending (the token database's distance).

Missing neighbours (K > N) are ``idx = -1`` and ``dist = +inf`` (``-inf`` for ``"ip"``). Ties go to
the smaller bank id.

How: each metric is one maximum-inner-product search, the ``cosine_topk`` op with
``unit_norm=False`` on every backend (C++ on the CPU, Triton on a GPU): ``"ip"`` as is, ``"cosine"``
on unit vectors, ``"l2"`` on augmented vectors ``q' = [q, 1]``, ``x' = [x, -||x||^2 / 2]`` (so that
``q' . x' = q . x - ||x||^2 / 2``, largest where ``||q - x||^2`` is smallest). The K found are then
scored again from the vectors, with faiss's and PatchCore's float32 arithmetic (so a drop-in gives
their values) or, with ``exact_distances=True``, in float64; then sorted by (distance, id).

On a CPU with bfloat16 dot products (AVX512-BF16, AMX), a large search with ``backend=None`` first
narrows each query to the few bank vectors within a proven error bound of its K-th best in a
bfloat16 matmul, and scores only those in float32 (:mod:`raid_fast.bf16_filter`;
``RAID_FAST_CPU_FILTER=auto|on|off``): the K best float32 values over the whole bank, as faiss
reports them, about 1.5x faster at PatchCore's size.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from raid_fast import _checks, bf16_filter, ops

METRICS = ("l2", "ip", "cosine")
# bounds the [chunk, K, D] float64 gather of the exact re-scoring
_RESCORE_ELEMENTS = 1 << 24
# candidates per chunk of the float32 re-scoring: its matmul costs chunk x distinct candidates x D,
# so small chunks keep it near the M x K x D it needs (1/3 of the time at PatchCore's scale, K = 1)
_RESCORE_CANDIDATES = 512


def check_metric(metric: str) -> str:
    _checks.check_choice("metric", metric, METRICS)
    return metric


def as_vectors(
    name: str, x, dim: int | None = None, ndims: tuple[int, ...] = (2,), check_finite: bool = True
) -> torch.Tensor:
    """A float tensor (numpy arrays accepted, no copy) of one of ``ndims`` dims, float32, finite
    (unless ``check_finite=False``: the caller checks)."""
    t = _checks.as_tensor(name, x)
    _checks.check_floating(name, t)
    layout = " or ".join({2: "[N, D]", 3: "[B, M, D]"}[n] for n in ndims)
    _checks.check_ndim(name, t, ndims, layout)
    if dim is not None and t.shape[-1] != dim:
        msg = f"{name} must have D={dim}, got shape {tuple(t.shape)}"
        raise ValueError(msg)
    t = t.float()
    if check_finite:
        _checks.check_finite(name, t)
    return t


def search_vectors(x: torch.Tensor, metric: str, side: str) -> torch.Tensor:
    """Vectors [N, D'] whose largest inner products rank ``metric`` (``side`` "query" or "bank")."""
    if metric == "cosine":
        return F.normalize(x, dim=-1)
    if metric == "ip":
        return x.contiguous()
    extra = torch.ones_like(x[..., :1]) if side == "query" else -0.5 * (x * x).sum(-1, keepdim=True)
    return torch.cat([x, extra], dim=-1)  # [.., D + 1]


# the last banks knn prepared for the search: repeated calls over one memory bank (PatchCore's
# scoring loop) skip the [N, D'] copy; keyed by the tensor itself and its version counter. Two
# entries of each kind ("search" copies, "filter" banks), so that one call over a short-lived bank
# does not evict the bank in use.
_BANK_CACHE: list[tuple[weakref.ref, tuple, object]] = []
_BANK_CACHE_SIZE = 2


def _cached_bank(bank, x: torch.Tensor, kind: str, metric: str, build: Callable[[], object]):
    """``build()`` (the bank ``x`` prepared as ``kind``), validated (finite) and built once per
    version of the caller's tensor ``bank``."""
    cacheable = isinstance(bank, torch.Tensor) and x is bank and not torch.compiler.is_compiling()
    if cacheable:
        key = (kind, metric, bank._version, bank.data_ptr(), tuple(bank.shape), bank.stride(), bank.device)
        _BANK_CACHE[:] = [entry for entry in _BANK_CACHE if entry[0]() is not None]  # banks still alive
        for i, (ref, cached_key, prepared) in enumerate(_BANK_CACHE):
            if ref() is bank and cached_key == key:
                _BANK_CACHE.append(_BANK_CACHE.pop(i))  # most recently used last
                return prepared
    _checks.check_finite("bank", x)
    prepared = build()
    if cacheable:
        # an older version of this bank goes; then the oldest entries of this kind beyond the size
        _BANK_CACHE[:] = [e for e in _BANK_CACHE if e[0]() is not bank or e[1][0] != kind]
        _BANK_CACHE.append((weakref.ref(bank), key, prepared))
        same_kind = [i for i, e in enumerate(_BANK_CACHE) if e[1][0] == kind]
        for i in reversed(same_kind[:-_BANK_CACHE_SIZE]):
            del _BANK_CACHE[i]
    return prepared


def _bank_search_vectors(bank, x: torch.Tensor, metric: str) -> torch.Tensor:
    """The bank's search vectors [N, D'], validated (finite) once per tensor version."""
    return _cached_bank(bank, x, "search", metric, lambda: search_vectors(x, metric, "bank"))


def flat_search(
    queries: torch.Tensor,
    x: torch.Tensor,
    k: int,
    metric: str,
    backend: str | None,
    search_bank: Callable[[], torch.Tensor],
    filter_bank: Callable[[], bf16_filter.FilterBank | None],
) -> torch.Tensor:
    """[M, C] candidate bank ids (C >= K, -1 pads) holding the exact K nearest of every query
    [M, D] in the bank ``x`` [N, D]: the bfloat16 filter over ``filter_bank()`` where it applies
    (:mod:`raid_fast.bf16_filter`), else the ``cosine_topk`` op over ``search_bank()`` [N, D']."""

    def search(q: torch.Tensor) -> torch.Tensor:
        sq = search_vectors(q, metric, "query")
        return ops.cosine_topk(sq, search_bank(), k, unit_norm=metric == "cosine", backend=backend)[1]

    m, d = queries.shape
    if bf16_filter.applies(m, x.shape[0], d, k, queries.device, backend):
        fb = filter_bank()
        if fb is not None:
            return bf16_filter.candidates(queries, fb, k, lambda rows: search(queries[rows]))
    return search(queries)


def rescore(
    queries: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, metric: str, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances of the candidates ``idx`` [M, K] (bank ids, -1 missing), sorted by (dist, id).

    ``exact=False``: float32 with faiss's and PatchCore's arithmetic, a matmul of the queries with
    the candidate rows, then ``-2 q.x + ||q||^2 + ||x||^2`` (clamped at 0) for ``"l2"``; the values
    equal theirs bit for bit where the matmul kernel is the same. ``exact=True``: float64 straight
    from the vectors (``||q - x||^2``), free of the expansion's cancellation for large norms.

    Returns dist [M, K] float32 (ascending; descending inner products for ``"ip"``) and idx [M, K].
    """
    m, k = idx.shape
    if metric == "cosine":
        queries, bank = F.normalize(queries, dim=-1), F.normalize(bank, dim=-1)
    dist = torch.empty(m, k, dtype=torch.float32, device=queries.device)
    rows = max(1, _RESCORE_ELEMENTS // max(1, k * queries.shape[1]))
    if not exact:
        # by the candidates present: the filter's [M, C] rows are mostly padding
        per_row = max(1, -(-int((idx >= 0).sum()) // max(1, m)))
        rows = min(rows, max(8, _RESCORE_CANDIDATES // per_row))
    for start in range(0, m, rows):
        sl = slice(start, start + rows)
        cand = idx[sl].clamp_min(0)  # [m', K]
        if exact:
            q = queries[sl].double()  # [m', D]
            x = bank[cand].double()  # [m', K, D]
            d = (q[:, None, :] - x).pow(2).sum(-1) if metric == "l2" else -(q[:, None, :] * x).sum(-1)
        else:
            # one matmul against the distinct candidate rows: the dots a full [m', N] matmul would give
            rows_used, where = torch.unique(cand, return_inverse=True)  # [U], [m', K]
            x = bank[rows_used]  # [U, D]
            dots = queries[sl] @ x.T  # [m', U]
            if metric == "l2":
                q_sq = queries[sl].pow(2).sum(-1, keepdim=True)  # [m', 1]
                d = dots.mul_(-2).add_(q_sq).add_(x.pow(2).sum(-1)[None, :]).clamp_min_(0)
            else:
                d = dots.neg_()
            d = d.gather(1, where)
        if metric == "cosine":
            d = d + 1.0
        dist[sl] = d.float()
    dist = dist.masked_fill(idx < 0, float("inf"))
    # (dist, id): ids first, then a stable sort by distance
    by_id = torch.where(idx < 0, torch.iinfo(torch.int64).max, idx).argsort(dim=1)
    dist, idx = dist.gather(1, by_id), idx.gather(1, by_id)
    order = dist.argsort(dim=1, stable=True)
    dist, idx = dist.gather(1, order), idx.gather(1, order)
    if metric == "ip":
        dist = -dist
    return dist, idx


def knn(
    queries,
    bank,
    k: int,
    metric: str = "l2",
    *,
    sqrt: bool = False,
    exact_distances: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact K nearest bank vectors of every query, like ``faiss.knn`` / ``IndexFlat.search``.

    Args:
        queries: [M, D] or [B, M, D] float tensor or numpy array.
        bank: [N, D] float tensor or numpy array, on the queries' device.
        k: neighbours per query (>= 1); more than N gives -1 ids in the extra slots.
        metric: ``"l2"`` (squared Euclidean), ``"ip"`` (inner product) or ``"cosine"`` (1 - cos).
        sqrt: with ``"l2"``, return the Euclidean distance instead of its square.
        exact_distances: the returned distances in float64 from the vectors (then rounded to
            float32) instead of faiss's float32 ``||q||^2 + ||x||^2 - 2 q.x``, which loses digits
            when the norms dwarf the distances. The neighbours are the same.
        backend: ``None`` (auto: on a CPU with bfloat16 dot products, large searches go through
            the exact bfloat16 candidate filter) or a backend of the ``cosine_topk`` op.

    Returns:
        ``(dist, idx)``: float32 / int64 [M, K] (or [B, M, K]); idx indexes ``bank`` rows.

    Example:
        >>> dist, idx = raid_fast.knn(patch_features, memory_bank, k=1)   # PatchCore's nearest neighbour
    """
    metric = check_metric(metric)
    q = as_vectors("queries", queries, ndims=(2, 3))
    x = as_vectors("bank", bank, dim=q.shape[-1], check_finite=False)  # checked with its search copy
    _checks.check_same_device(queries=q, bank=x)
    k = _checks.check_int("k", k, minimum=1)
    if sqrt and metric != "l2":
        msg = f"sqrt=True applies to metric='l2' only, got metric={metric!r}"
        raise ValueError(msg)
    flat = q.reshape(-1, q.shape[-1])  # [B * M, D]
    cand = flat_search(  # [B * M, C]
        flat,
        x,
        k,
        metric,
        backend,
        lambda: _bank_search_vectors(bank, x, metric),
        lambda: _cached_bank(bank, x, "filter", metric, lambda: bf16_filter.prepare_bank(x, metric)),
    )
    dist, idx = rescore(flat, x, cand, metric, exact_distances)
    dist, idx = dist[:, :k].contiguous(), idx[:, :k].contiguous()
    if sqrt:
        dist = dist.sqrt()
    return dist.view(*q.shape[:-1], k), idx.view(*q.shape[:-1], k)
