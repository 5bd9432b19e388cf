"""Every op as a torch custom op, ``torch.ops.raid_fast.<name>``, so that ``torch.compile`` (no graph
breaks) and ``torch.export`` / AOTInductor (the op in the exported program) see it.

Per op: the schema of :data:`raid_fast.ops.schema.SCHEMAS`; one kernel for CPU and one for CUDA
tensors, both the dispatcher's auto selection (C++ on the CPU when built, else the torch
reference; Triton or the CUDA extension on a GPU), so a compiled graph runs the same code as eager
auto mode; a fake (meta) implementation from shapes alone; an autograd rule that marks the outputs
non-differentiable (indices and distances of a search carry no gradient).

Outputs are always fresh contiguous tensors (an op may not return its input, e.g. the given class
ids of ``probe_prototypes``), which is what the fakes promise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from raid_fast import _dispatch
from raid_fast.ops.schema import SCHEMAS

NAMESPACE = "raid_fast"


def _fresh(out: Any, inputs: tuple) -> Any:
    """``out`` with every tensor contiguous and sharing no storage with an input."""
    if isinstance(out, tuple):
        return tuple(_fresh(o, inputs) for o in out)
    if not torch.is_tensor(out):
        return out
    ptr = out.untyped_storage().data_ptr()
    if out.numel() and any(torch.is_tensor(t) and t.numel() and t.untyped_storage().data_ptr() == ptr for t in inputs):
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def _kernel(name: str) -> Callable[..., Any]:
    @functools.wraps(_dispatch.call)
    def run(*args: Any) -> Any:
        return _fresh(_dispatch.call(name, *args), args)

    return run


def _f32(t: torch.Tensor, *shape: int) -> torch.Tensor:
    return t.new_empty(shape, dtype=torch.float32)


def _i64(t: torch.Tensor, *shape: int) -> torch.Tensor:
    return t.new_empty(shape, dtype=torch.int64)


def _search_fake(queries, k):
    m = queries.shape[0]
    return _f32(queries, m, k), _i64(queries, m, k)


def _kmeans_groups(offsets) -> int:
    return offsets.shape[0] - 1


# shapes only: a fake never reads data
FAKES: dict[str, Callable[..., Any]] = {
    "cosine_topk": lambda queries, tokens, k, *rest: _search_fake(queries, k),
    "ivf_topk": lambda queries, probes, list_offsets, tokens, k, *rest: _search_fake(queries, k),
    "ivf_topk_cost_volume": lambda queries, probes, list_offsets, tokens, k, tg, eg, b, h, w, pad=1.0: (
        *_search_fake(queries, k),
        _f32(queries, b, k, h, w),
    ),
    "cost_volume": lambda dist, h, w, pad=1.0: _f32(dist, dist.shape[0], dist.shape[2], h, w),
    "probe_prototypes": lambda queries, sem, bias, class_ids, p, *rest: (
        _i64(queries, queries.shape[0]),
        _f32(queries, queries.shape[0] * queries.shape[1], queries.shape[2]),
        _i64(queries, queries.shape[0], queries.shape[1], p),
        _f32(queries, *queries.shape),
    ),
    "kmeans_assign": lambda x, offsets, max_size, centroids: (_f32(x, x.shape[0]), _i64(x, x.shape[0])),
    "kmeans_update": lambda x, offsets, max_size, idx, k, spherical: (
        _f32(x, _kmeans_groups(offsets), k, x.shape[1]),
        _i64(x, _kmeans_groups(offsets), k),
    ),
    "kmeans_step": lambda x, offsets, max_size, centroids, spherical: (
        _f32(x, x.shape[0]),
        _i64(x, x.shape[0]),
        _f32(x, *centroids.shape),
        _i64(x, *centroids.shape[:2]),
    ),
    "kmeans_plusplus": lambda x, offsets, max_size, k, uniforms: (
        _f32(x, _kmeans_groups(offsets), k, x.shape[1]),
        _i64(x, _kmeans_groups(offsets), k),
    ),
}


def _setup_context(ctx, inputs, output) -> None:
    outs = output if isinstance(output, tuple) else (output,)
    ctx.mark_non_differentiable(*outs)


def _backward(ctx, *grads):
    # unreachable: every output is marked non-differentiable
    msg = "raid_fast ops are not differentiable"
    raise RuntimeError(msg)


_LIBRARY = torch.library.Library(NAMESPACE, "DEF")  # kept alive: dropping it unregisters the ops
for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(_name + _schema, tags=(torch.Tag.pt2_compliant_tag,))
    _qualified = f"{NAMESPACE}::{_name}"
    for _device in ("cpu", "cuda"):
        torch.library.register_kernel(_qualified, _device, _kernel(_name), lib=_LIBRARY)
    torch.library.register_fake(_qualified, FAKES[_name], lib=_LIBRARY)
    torch.library.register_autograd(_qualified, _backward, setup_context=_setup_context, lib=_LIBRARY)


def op(name: str) -> torch._ops.OpOverload:
    """``torch.ops.raid_fast.<name>.default``."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default
