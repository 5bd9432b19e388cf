"""The ``triton`` backend: the table of Triton launchers the dispatcher loads.

CUDA tensors, or any tensors under ``TRITON_INTERPRET=1`` (then only for explicit requests: auto
selection never picks interpreted kernels). Every launch runs under a device guard, since Triton
launches on the current CUDA device, not on the tensors' one. Importing this module imports the
kernel modules: a broken one raises here, and the dispatcher re-raises that error for an explicit
``backend="triton"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from raid_fast.kernels import TRITON_INTERPRET, _available
from raid_fast.kernels import cosine_topk as _cosine_topk
from raid_fast.kernels import kmeans as _kmeans
from raid_fast.kernels.cosine_filter import cosine_topk_flat
from raid_fast.kernels.cost_volume import cost_volume_triton
from raid_fast.kernels.ivf_topk import ivf_topk_cost_volume_triton, ivf_topk_triton
from raid_fast.kernels.probe import MAX_CLASSES, MAX_SLOTS, probe_prototypes_triton

from raid_fast._dispatch import Args, Backend, Impl

_INT = (torch.int64, torch.int32)
_F32 = (torch.float32,)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` launched on the device of its first argument (a tensor on cuda:1 while cuda:0 is current)."""

    @functools.wraps(fn)
    def run(first: torch.Tensor, *args: Any) -> Any:
        if first.is_cuda:
            with torch.cuda.device(first.device):
                return fn(first, *args)
        return fn(first, *args)

    return run


def _cosine_topk_run(queries, tokens, k, lo, hi, token_group, exclude_group, unit_norm):
    # the threshold-filter variants bound dots by unit norms; any other norms take the streaming search
    search = cosine_topk_flat if unit_norm else _cosine_topk.cosine_topk_triton
    return search(queries, tokens, k, lo, hi, token_group, exclude_group)


def _groups(offsets: torch.Tensor, max_size: int) -> SimpleNamespace:
    # what the Lloyd launchers read of a raid_fast._ragged.Groups
    return SimpleNamespace(offsets=offsets.to(torch.int64), n_groups=offsets.numel() - 1, max_size=max_size)


def _kmeans_assign(x, offsets, max_size, centroids):
    return _kmeans.kmeans_assign_triton(x.contiguous(), _groups(offsets, max_size), centroids.contiguous())


def _kmeans_step(x, offsets, max_size, centroids, spherical):
    return _kmeans.kmeans_step_triton(x.contiguous(), _groups(offsets, max_size), centroids.contiguous(), spherical)


def _tensor_reason(name: str, t: torch.Tensor | None, device: torch.device, dtypes: tuple) -> str | None:
    if t is None:
        return None
    if t.device != device:
        return f"{name} is on {t.device}, expected {device} like the first input"
    if t.dtype not in dtypes:
        return f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}"
    return None


def _first_reason(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r is not None), None)


def _device_reason(t: torch.Tensor) -> str | None:
    if t.device.type != "cuda" and not TRITON_INTERPRET:
        return f"tensors are on {t.device}; compiled triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
    return None


def _search_reason(a: Args) -> str | None:
    max_k, max_dim, max_tokens = _cosine_topk.MAX_K, _cosine_topk.MAX_DIM, _cosine_topk.MAX_TOKENS
    dev = a.queries.device
    return _first_reason(
        _device_reason(a.queries),
        _tensor_reason("queries", a.queries, dev, _F32),
        _tensor_reason("tokens", a.tokens, dev, _F32),
        f"k={a.k} is above the triton maximum {max_k}" if a.k > max_k else None,
        f"D={a.queries.shape[1]} is above the triton maximum {max_dim}" if a.queries.shape[1] > max_dim else None,
        f"N={a.tokens.shape[0]} tokens is above {max_tokens} (ids are packed into 32 bits)"
        if a.tokens.shape[0] > max_tokens
        else None,
    )


def _groups_reason(a: Args) -> str | None:
    if a.exclude_group is not None and a.token_group is None:
        return "exclude_group needs token_group"
    dev = a.queries.device
    return _first_reason(
        _tensor_reason("token_group", a.token_group, dev, _INT),
        _tensor_reason("exclude_group", a.exclude_group, dev, _INT),
    )


def _cosine_topk_supports(a: Args) -> str | None:
    dev = a.queries.device
    return _first_reason(
        _search_reason(a),
        _tensor_reason("lo", a.lo, dev, _INT),
        _tensor_reason("hi", a.hi, dev, _INT),
        _groups_reason(a),
    )


def _ivf_topk_supports(a: Args) -> str | None:
    dev = a.queries.device
    return _first_reason(
        _search_reason(a),
        _tensor_reason("probes", a.probes, dev, _INT),
        _tensor_reason("list_offsets", a.list_offsets, dev, _INT),
        _groups_reason(a),
    )


def _cost_volume_supports(a: Args) -> str | None:
    return _first_reason(_device_reason(a.dist), _tensor_reason("dist", a.dist, a.dist.device, _F32))


def _probe_supports(a: Args) -> str | None:
    dev = a.queries.device
    n_cls, s = a.semantic_prototypes.shape[:2]
    return _first_reason(
        _device_reason(a.queries),
        _tensor_reason("queries", a.queries, dev, _F32),
        _tensor_reason("semantic_prototypes", a.semantic_prototypes, dev, _F32),
        _tensor_reason("class_ids", a.class_ids, dev, (torch.int64,)),
        _tensor_reason("query_cls", a.query_cls, dev, _F32),
        _tensor_reason("class_prototypes", a.class_prototypes, dev, _F32),
        f"S={s} prototype slots is above the triton maximum {MAX_SLOTS}" if s > MAX_SLOTS else None,
        f"C={n_cls} classes is above the triton maximum {MAX_CLASSES}" if n_cls > MAX_CLASSES else None,
    )


def _kmeans_supports(a: Args) -> str | None:
    k = a.centroids.shape[1]
    return _first_reason(
        _device_reason(a.x),
        None
        if a.x.dtype in _kmeans.LOW_DTYPES
        else f"needs float16 or bfloat16 points (raid_fast.kmeans(precision='fp16' or 'bf16')), got {a.x.dtype}",
        _tensor_reason("centroids", a.centroids, a.x.device, _F32),
        f"k={k} is above the triton maximum {_kmeans.MAX_K}" if k > _kmeans.MAX_K else None,
        f"a group of {a.max_size} x {a.x.shape[1]} values is above the triton maximum {_kmeans.MAX_GROUP_ELEMENTS}"
        if (a.max_size + _kmeans.MAX_TILE) * a.x.shape[1] > _kmeans.MAX_GROUP_ELEMENTS
        else None,
    )


BACKENDS = (
    Backend(
        "triton",
        priority=5,
        available=_available,
        auto=not TRITON_INTERPRET,
        impls={
            "cosine_topk": Impl(_guarded(_cosine_topk_run), _cosine_topk_supports),
            "ivf_topk": Impl(_guarded(ivf_topk_triton), _ivf_topk_supports),
            "ivf_topk_cost_volume": Impl(_guarded(ivf_topk_cost_volume_triton), _ivf_topk_supports),
            "cost_volume": Impl(_guarded(cost_volume_triton), _cost_volume_supports),
            "probe_prototypes": Impl(_guarded(probe_prototypes_triton), _probe_supports),
            "kmeans_assign": Impl(_guarded(_kmeans_assign), _kmeans_supports),
            "kmeans_step": Impl(_guarded(_kmeans_step), _kmeans_supports),
        },
    ),
)
