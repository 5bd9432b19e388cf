"""Search ops behind the dispatcher: exact cosine top-K, inverted-list top-K, cost volume, and
inverted-list top-K with its cost volume in one call (``ivf_topk_cost_volume``).

Letters: M queries, N tokens, D dims, K neighbours, P probed lists, B images, L = H * W.
``probe_prototypes`` (internal, called by ``retrieve``) normalises query tokens and picks their
top-P prototypes. Conventions (package-wide): results are ``(dist, idx)``, float32 / int64, sorted ascending by
1 - cos; missing neighbours are ``idx = -1``, ``dist = +inf`` and become ``pad_cost`` in a cost
volume. Backends: ``torch`` (``raid_fast.ref``), ``cpp`` (extension, CPU float32 tensors), ``triton``
(``raid_fast.kernels``); see ``raid_fast._dispatch``.
"""

from __future__ import annotations

import torch

from raid_fast import _checks, _dispatch


def _check_pair(queries: torch.Tensor, tokens: torch.Tensor, k: int) -> None:
    _checks.check_ndim("queries", queries, (2,), "[M, D]")
    _checks.check_ndim("tokens", tokens, (2,), "[N, D]")
    if queries.shape[1] != tokens.shape[1]:
        msg = f"queries must have D={tokens.shape[1]} like tokens, got shape {tuple(queries.shape)}"
        raise ValueError(msg)
    _checks.check_dtype("queries", queries, (torch.float32,))
    _checks.check_dtype("tokens", tokens, (torch.float32,))
    _checks.check_same_device(queries=queries, tokens=tokens)
    _checks.check_int("k", k, minimum=1)


def cosine_topk(
    queries: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    token_group: torch.Tensor | None = None,
    exclude_group: torch.Tensor | None = None,
    *,
    unit_norm: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-K by 1 - cos of unit-norm ``queries`` [M, D] over ``tokens`` [N, D].

    ``lo``/``hi`` [M] restrict query m to tokens lo[m] <= n < hi[m]; ``token_group`` [N] and
    ``exclude_group`` [M] hide tokens whose group equals the query's (-1 hides none).
    ``unit_norm=False`` ranks by 1 - q . t for vectors of any norm (inner product; ``raid_fast.knn``).
    See ``raid_fast.ref.similarity.cosine_topk_ref`` for the exact definition.
    """
    _check_pair(queries, tokens, k)
    return _dispatch.call(
        "cosine_topk", queries, tokens, k, lo, hi, token_group, exclude_group, bool(unit_norm), backend=backend
    )


def _check_ivf(queries: torch.Tensor, probes: torch.Tensor, tokens: torch.Tensor, k: int) -> None:
    _check_pair(queries, tokens, k)
    _checks.check_ndim("probes", probes, (2,), "[M, P]")
    if probes.shape[0] != queries.shape[0]:
        msg = f"probes must have one row per query ({queries.shape[0]}), got shape {tuple(probes.shape)}"
        raise ValueError(msg)


def ivf_topk(
    queries: torch.Tensor,
    probes: torch.Tensor,
    list_offsets: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    token_group: torch.Tensor | None = None,
    exclude_group: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K by 1 - cos over the union of each query's probed lists (CSR ``list_offsets``).

    ``probes`` [M, P] holds distinct list ids per row, -1 for unused slots. See
    ``raid_fast.ref.ivf_search.ivf_topk_ref`` for the exact definition.
    """
    _check_ivf(queries, probes, tokens, k)
    return _dispatch.call(
        "ivf_topk", queries, probes, list_offsets, tokens, k, token_group, exclude_group, backend=backend
    )


def ivf_topk_cost_volume(
    queries: torch.Tensor,
    probes: torch.Tensor,
    list_offsets: torch.Tensor,
    tokens: torch.Tensor,
    k: int,
    token_group: torch.Tensor | None,
    exclude_group: torch.Tensor | None,
    b: int,
    h: int,
    w: int,
    pad_cost: float = 1.0,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ivf_topk`` of M = b * h * w queries (image-major, row-major grids) and its cost volume.

    Returns dist [M, K], idx [M, K] as ``ivf_topk`` and volume [B, K, H, W] float32 equal to
    ``cost_volume(dist.view(b, h * w, k), h, w, pad_cost)``; a backend that can writes the volume in
    the same pass as the merge (triton).
    """
    _check_ivf(queries, probes, tokens, k)
    b = _checks.check_int("b", b, minimum=0)
    h = _checks.check_int("h", h, minimum=1)
    w = _checks.check_int("w", w, minimum=1)
    if queries.shape[0] != b * h * w:
        msg = f"queries must be M = b * h * w = {b * h * w} rows (b={b}, h={h}, w={w}), got {queries.shape[0]}"
        raise ValueError(msg)
    return _dispatch.call(
        "ivf_topk_cost_volume",
        queries,
        probes,
        list_offsets,
        tokens,
        k,
        token_group,
        exclude_group,
        b,
        h,
        w,
        float(pad_cost),
        backend=backend,
    )


def cost_volume(
    dist: torch.Tensor, h: int, w: int, pad_cost: float = 1.0, *, backend: str | None = None
) -> torch.Tensor:
    """[B, L, K] distances -> [B, K, H, W] cost volume (L = H * W); +inf becomes ``pad_cost``."""
    _checks.check_ndim("dist", dist, (3,), "[B, L, K]")
    h = _checks.check_int("h", h, minimum=1)
    w = _checks.check_int("w", w, minimum=1)
    if dist.shape[1] != h * w:
        msg = f"h * w must equal the number of query tokens L={dist.shape[1]}, got h={h}, w={w}"
        raise ValueError(msg)
    return _dispatch.call("cost_volume", dist, h, w, float(pad_cost), backend=backend)
