"""Search ops behind the dispatcher: exact cosine top-K, inverted-list top-K, cost volume, and
inverted-list top-K with its cost volume in one call (``ivf_topk_cost_volume``).

Letters: M queries, N tokens, D dims, K neighbours, P probed lists, B images, L = H * W.
``probe_prototypes`` (internal, called by ``retrieve``) normalises query tokens and picks their
top-P prototypes. Conventions (package-wide): results are ``(dist, idx)``, float32 / int64, sorted ascending by
1 - cos; missing neighbours are ``idx = -1``, ``dist = +inf`` and become ``pad_cost`` in a cost
volume. Backends: ``torch`` (``raid_fast.ref``) and ``cpp`` (extension, CPU float32 tensors) here;
``triton`` registers itself from ``raid_fast.kernels``.
"""

from __future__ import annotations

import torch

from raid_fast import _checks, _dispatch, _ext
from raid_fast.ref.cost_volume import cost_volume_ref
from raid_fast.ref.ivf_search import ivf_topk_ref
from raid_fast.ref.probe import probe_prototypes_ref
from raid_fast.ref.similarity import cosine_topk_ref

_dispatch.register("cosine_topk", "torch", cosine_topk_ref, priority=100)
_dispatch.register("ivf_topk", "torch", ivf_topk_ref, priority=100)
_dispatch.register("cost_volume", "torch", cost_volume_ref, priority=100)
# internal: the first step of hierarchical retrieval (inputs validated by retrieve())
_dispatch.register("probe_prototypes", "torch", probe_prototypes_ref, priority=100)


def _ivf_topk_cost_volume_torch(
    queries, probes, list_offsets, tokens, k, token_group, exclude_group, b, h, w, pad_cost=1.0
):
    # the definition: the inverted-list top-K, then its distances laid out as a volume
    dist, idx = ivf_topk_ref(queries, probes, list_offsets, tokens, k, token_group, exclude_group)
    return dist, idx, cost_volume_ref(dist.view(b, h * w, k), h, w, pad_cost)


_dispatch.register("ivf_topk_cost_volume", "torch", _ivf_topk_cost_volume_torch, priority=100)


def _ids(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.int64).contiguous()


def _cosine_topk_cpp(queries, tokens, k, lo=None, hi=None, token_group=None, exclude_group=None):
    return _ext._C.cosine_topk(
        queries.contiguous(),
        tokens.contiguous(),
        int(k),
        _ids(lo),
        _ids(hi),
        _ids(token_group),
        _ids(exclude_group),
        torch.get_num_threads(),
    )


def _ivf_topk_cpp(queries, probes, list_offsets, tokens, k, token_group=None, exclude_group=None):
    return _ext._C.ivf_topk(
        queries.contiguous(),
        _ids(probes),
        _ids(list_offsets),
        tokens.contiguous(),
        int(k),
        _ids(token_group),
        _ids(exclude_group),
        torch.get_num_threads(),
    )


_INT_DTYPES = (torch.int64, torch.int32)


def _cpp_reason(floats: dict, ints: dict) -> str | None:
    """Why the cpp backend cannot take these tensors (CPU float32 values, CPU integer ids), or None."""
    for name, t in {**floats, **ints}.items():
        if t is not None and t.device.type != "cpu":
            return f"{name} is on {t.device}; the cpp search kernels need CPU tensors"
    for name, t in floats.items():
        if t.dtype != torch.float32:
            return f"{name} must be torch.float32, got {t.dtype}"
    for name, t in ints.items():
        if t is not None and t.dtype not in _INT_DTYPES:
            return f"{name} must be torch.int64 or torch.int32, got {t.dtype}"
    if ints["exclude_group"] is not None and ints["token_group"] is None:
        return "exclude_group needs token_group"
    if floats["tokens"].shape[0] >= 2**32:
        return f"N={floats['tokens'].shape[0]} tokens is not below 2^32 (ids are packed into 32 bits)"
    return None


def _cosine_topk_cpp_supports(queries, tokens, k, lo=None, hi=None, token_group=None, exclude_group=None):
    if (lo is None) != (hi is None):
        return "lo and hi must be given together"
    ints = {"lo": lo, "hi": hi, "token_group": token_group, "exclude_group": exclude_group}
    return _cpp_reason({"queries": queries, "tokens": tokens}, ints)


def _ivf_topk_cpp_supports(queries, probes, list_offsets, tokens, k, token_group=None, exclude_group=None):
    ints = {"probes": probes, "list_offsets": list_offsets, "token_group": token_group, "exclude_group": exclude_group}
    return _cpp_reason({"queries": queries, "tokens": tokens}, ints)


_dispatch.register(
    "cosine_topk",
    "cpp",
    _cosine_topk_cpp,
    priority=10,
    available=_ext.ext_unavailable_reason,
    supports=_cosine_topk_cpp_supports,
)
_dispatch.register(
    "ivf_topk",
    "cpp",
    _ivf_topk_cpp,
    priority=10,
    available=_ext.ext_unavailable_reason,
    supports=_ivf_topk_cpp_supports,
)


def _ivf_topk_cost_volume_cpp(
    queries, probes, list_offsets, tokens, k, token_group, exclude_group, b, h, w, pad_cost=1.0
):
    # the cpp search, then the torch layout (a permute and a fill: nothing to gain in C++)
    dist, idx = _ivf_topk_cpp(queries, probes, list_offsets, tokens, k, token_group, exclude_group)
    return dist, idx, cost_volume_ref(dist.view(b, h * w, k), h, w, pad_cost)


def _ivf_topk_cost_volume_cpp_supports(
    queries, probes, list_offsets, tokens, k, token_group, exclude_group, b, h, w, pad_cost=1.0
):
    return _ivf_topk_cpp_supports(queries, probes, list_offsets, tokens, k, token_group, exclude_group)


_dispatch.register(
    "ivf_topk_cost_volume",
    "cpp",
    _ivf_topk_cost_volume_cpp,
    priority=10,
    available=_ext.ext_unavailable_reason,
    supports=_ivf_topk_cost_volume_cpp_supports,
)


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-K by 1 - cos of unit-norm ``queries`` [M, D] over ``tokens`` [N, D].

    ``lo``/``hi`` [M] restrict query m to tokens lo[m] <= n < hi[m]; ``token_group`` [N] and
    ``exclude_group`` [M] hide tokens whose group equals the query's (-1 hides none). See
    ``raid_fast.ref.similarity.cosine_topk_ref`` for the exact definition.
    """
    _check_pair(queries, tokens, k)
    _dispatch.load_optional_backends()
    return _dispatch.call("cosine_topk", queries, tokens, k, lo, hi, token_group, exclude_group, backend=backend)


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
    _dispatch.load_optional_backends()
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
    _dispatch.load_optional_backends()
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
    _dispatch.load_optional_backends()
    return _dispatch.call("cost_volume", dist, h, w, float(pad_cost), backend=backend)
