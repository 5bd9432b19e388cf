"""Every op as a torch custom op, ``torch.ops.raid_fast.<name>``, so that ``torch.compile`` (no graph
breaks) and ``torch.export`` / AOTInductor (the op in the exported program) see it.

Per op: the schema and the fake of :mod:`raid_fast.ops.schema`; one kernel for CPU and one for CUDA
tensors, both the dispatcher's auto selection (C++ on the CPU when built, else the torch
reference; Triton or the CUDA extension on a GPU), so a compiled graph runs the same code as eager
auto mode; its fake (meta) implementation; an autograd rule that marks the outputs
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
from raid_fast.ops.schema import FAKES, SCHEMAS

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
