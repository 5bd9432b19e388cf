"""Triton kernels of raid_fast, installed as ``raid_fast.kernels``; the only place that imports triton.

``HAS_TRITON`` says whether triton imported; ``TRITON_IMPORT_ERROR`` says why not. Kernels register
their backends with ``raid_fast._dispatch`` when this package is imported.
"""

from __future__ import annotations

import os

TRITON_IMPORT_ERROR: str | None
try:
    import triton  # noqa: F401

    TRITON_IMPORT_ERROR = None
except ImportError as exc:
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

HAS_TRITON = TRITON_IMPORT_ERROR is None
# set before triton is first imported; auto dispatch never picks interpreted kernels
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
