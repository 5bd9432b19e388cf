"""Triton kernels of raid_fast, installed as ``raid_fast.kernels``; the only place that imports triton.

``HAS_TRITON`` says whether triton imported; ``TRITON_IMPORT_ERROR`` says why not. Kernels register
their backends with ``raid_fast._dispatch`` when this package is imported: ``triton`` for
``cosine_topk`` (streaming or filtered, see ``cosine_filter.flat_search``), ``ivf_topk``,
``ivf_topk_cost_volume`` (the merge writes the volume too) and ``cost_volume`` (float32),
``probe_prototypes`` (the first step of hierarchical retrieval), and
``kmeans_assign`` / ``kmeans_step`` (float16 or bfloat16 points, for
``raid_fast.kmeans(precision=...)``); CUDA tensors, or any tensors under ``TRITON_INTERPRET=1``,
where auto selection skips them.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from raid_fast import _dispatch

TRITON_IMPORT_ERROR: str | None
try:
    import triton  # noqa: F401

    TRITON_IMPORT_ERROR = None
except ImportError as exc:
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

HAS_TRITON = TRITON_IMPORT_ERROR is None
# set before triton is first imported; auto dispatch never picks interpreted kernels
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

KERNEL_IMPORT_ERROR: str | None = None
# op -> host launcher, filled when the kernel modules import
_LAUNCHERS: dict[str, Any] = {}
if HAS_TRITON:
    try:
        from raid_fast.kernels import cosine_topk as _cosine_topk
        from raid_fast.kernels import kmeans as _kmeans
        from raid_fast.kernels.cosine_filter import cosine_topk_flat
        from raid_fast.kernels.cost_volume import cost_volume_triton
        from raid_fast.kernels.ivf_topk import ivf_topk_cost_volume_triton, ivf_topk_triton
        from raid_fast.kernels.kmeans import kmeans_assign_triton, kmeans_step_triton
        from raid_fast.kernels.probe import MAX_CLASSES, MAX_SLOTS, probe_prototypes_triton

        _LAUNCHERS = {
            "cosine_topk": cosine_topk_flat,
            "ivf_topk": ivf_topk_triton,
            "ivf_topk_cost_volume": ivf_topk_cost_volume_triton,
            "cost_volume": cost_volume_triton,
            "kmeans_assign": kmeans_assign_triton,
            "kmeans_step": kmeans_step_triton,
            "probe_prototypes": probe_prototypes_triton,
        }
    except Exception as exc:  # a triton too old or too new must not break `import raid_fast`
        KERNEL_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _available() -> str | None:
    if not HAS_TRITON:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    if KERNEL_IMPORT_ERROR is not None:
        return f"the triton kernels failed to import ({KERNEL_IMPORT_ERROR})"
    if not TRITON_INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run interpreted on CPU)"
    return None


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


_INT = (torch.int64, torch.int32)
_F32 = (torch.float32,)


def _search_reason(queries: torch.Tensor, tokens: torch.Tensor, k: Any) -> str | None:
    # only asked once _available() passed, so the kernel module and its limits exist
    max_k, max_dim, max_tokens = _cosine_topk.MAX_K, _cosine_topk.MAX_DIM, _cosine_topk.MAX_TOKENS
    dev = queries.device
    return _first_reason(
        _device_reason(queries),
        _tensor_reason("queries", queries, dev, _F32),
        _tensor_reason("tokens", tokens, dev, _F32),
        f"k={k} is above the triton maximum {max_k}" if k > max_k else None,
        f"D={queries.shape[1]} is above the triton maximum {max_dim}" if queries.shape[1] > max_dim else None,
        f"N={tokens.shape[0]} tokens is above {max_tokens} (ids are packed into 32 bits)"
        if tokens.shape[0] > max_tokens
        else None,
    )


def _groups_reason(token_group, exclude_group, dev) -> str | None:
    if exclude_group is not None and token_group is None:
        return "exclude_group needs token_group"
    return _first_reason(
        _tensor_reason("token_group", token_group, dev, _INT),
        _tensor_reason("exclude_group", exclude_group, dev, _INT),
    )


def _cosine_topk_supports(queries, tokens, k, lo=None, hi=None, token_group=None, exclude_group=None):
    dev = queries.device
    return _first_reason(
        _search_reason(queries, tokens, k),
        _tensor_reason("lo", lo, dev, _INT),
        _tensor_reason("hi", hi, dev, _INT),
        _groups_reason(token_group, exclude_group, dev),
    )


def _ivf_topk_supports(queries, probes, list_offsets, tokens, k, token_group=None, exclude_group=None):
    dev = queries.device
    return _first_reason(
        _search_reason(queries, tokens, k),
        _tensor_reason("probes", probes, dev, _INT),
        _tensor_reason("list_offsets", list_offsets, dev, _INT),
        _groups_reason(token_group, exclude_group, dev),
    )


def _ivf_topk_cost_volume_supports(
    queries, probes, list_offsets, tokens, k, token_group, exclude_group, b, h, w, pad_cost=1.0
):
    return _ivf_topk_supports(queries, probes, list_offsets, tokens, k, token_group, exclude_group)


def _cost_volume_supports(dist, h, w, pad_cost=1.0):
    return _first_reason(_device_reason(dist), _tensor_reason("dist", dist, dist.device, _F32))


def _probe_supports(
    queries, semantic_prototypes, bias, class_ids, p, min_used=0, query_cls=None, class_prototypes=None
):
    dev = queries.device
    n_cls, s = semantic_prototypes.shape[:2]
    return _first_reason(
        _device_reason(queries),
        _tensor_reason("queries", queries, dev, _F32),
        _tensor_reason("semantic_prototypes", semantic_prototypes, dev, _F32),
        _tensor_reason("class_ids", class_ids, dev, (torch.int64,)),
        _tensor_reason("query_cls", query_cls, dev, _F32),
        _tensor_reason("class_prototypes", class_prototypes, dev, _F32),
        f"S={s} prototype slots is above the triton maximum {MAX_SLOTS}" if s > MAX_SLOTS else None,
        f"C={n_cls} classes is above the triton maximum {MAX_CLASSES}" if n_cls > MAX_CLASSES else None,
    )


def _kmeans_supports(x, groups, centroids, *args):
    k = centroids.shape[1]
    return _first_reason(
        _device_reason(x),
        None
        if x.dtype in _kmeans.LOW_DTYPES
        else f"needs float16 or bfloat16 points (raid_fast.kmeans(precision='fp16' or 'bf16')), got {x.dtype}",
        _tensor_reason("centroids", centroids, x.device, _F32),
        f"k={k} is above the triton maximum {_kmeans.MAX_K}" if k > _kmeans.MAX_K else None,
        f"a group of {groups.max_size} x {x.shape[1]} values is above the triton maximum {_kmeans.MAX_GROUP_ELEMENTS}"
        if (groups.max_size + _kmeans.MAX_TILE) * x.shape[1] > _kmeans.MAX_GROUP_ELEMENTS
        else None,
    )


if HAS_TRITON:

    def _unavailable(*args: Any) -> Any:
        msg = f"the triton kernels failed to import ({KERNEL_IMPORT_ERROR})"
        raise RuntimeError(msg)

    for _op, _supports in (
        ("cosine_topk", _cosine_topk_supports),
        ("ivf_topk", _ivf_topk_supports),
        ("ivf_topk_cost_volume", _ivf_topk_cost_volume_supports),
        ("cost_volume", _cost_volume_supports),
        ("kmeans_assign", _kmeans_supports),
        ("kmeans_step", _kmeans_supports),
        ("probe_prototypes", _probe_supports),
    ):
        _dispatch.register(
            _op,
            "triton",
            _LAUNCHERS.get(_op, _unavailable),
            priority=5,
            available=_available,
            supports=_supports,
            auto=not TRITON_INTERPRET,
        )
