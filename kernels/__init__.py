"""Triton kernels of raid_fast, installed as ``raid_fast.kernels``; the only place that imports triton.

``HAS_TRITON`` says whether triton imported (``TRITON_IMPORT_ERROR`` why not), ``KERNEL_IMPORT_ERROR``
whether the kernel modules did. The backend table the dispatcher loads is :mod:`raid_fast.kernels.backend`.
"""

from __future__ import annotations

import importlib
import os

import torch

TRITON_IMPORT_ERROR: str | None
TRITON_VERSION: str | None = None
try:
    import triton

    TRITON_IMPORT_ERROR = None
    TRITON_VERSION = triton.__version__
except ImportError as exc:
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

HAS_TRITON = TRITON_IMPORT_ERROR is None
# set before triton is first imported; auto dispatch never picks interpreted kernels
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

KERNEL_MODULES = ("cosine_topk", "cosine_filter", "cost_volume", "ivf_topk", "kmeans", "probe")
KERNEL_IMPORT_ERROR: str | None = None
if HAS_TRITON:
    try:
        for _name in KERNEL_MODULES:
            importlib.import_module(f"raid_fast.kernels.{_name}")
    except Exception as exc:  # a triton too old or too new must not break `import raid_fast`
        KERNEL_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def _available() -> str | None:
    """None when the triton kernels can run here, else why not."""
    if not HAS_TRITON:
        return f"triton is not importable ({TRITON_IMPORT_ERROR})"
    if KERNEL_IMPORT_ERROR is not None:
        return f"the triton kernels failed to import ({KERNEL_IMPORT_ERROR})"
    if not TRITON_INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run interpreted on CPU)"
    return None
