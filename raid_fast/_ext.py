"""Guarded import of the compiled extension ``raid_fast._C``.

``import raid_fast`` never fails because of the extension: a missing or broken build is recorded
in ``EXT_IMPORT_ERROR`` and shown by ``raid_fast.backends()``; an explicit request for an
extension backend raises it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_C: ModuleType | None
EXT_IMPORT_ERROR: str | None
try:
    _C = importlib.import_module("raid_fast._C")

    EXT_IMPORT_ERROR = None
except (ImportError, OSError) as exc:
    _C = None
    EXT_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

HAS_EXT: bool = _C is not None
EXT_HAS_CUDA: bool = bool(_C is not None and _C.cuda_compiled())


def ext_unavailable_reason() -> str | None:
    """None when the extension is importable, else why not (build or import error)."""
    if _C is not None:
        return None
    return f"raid_fast._C is not built or failed to import ({EXT_IMPORT_ERROR})"


def ext_cuda_unavailable_reason() -> str | None:
    """None when the extension has CUDA kernels and a GPU is visible, else why not."""
    import torch

    reason = ext_unavailable_reason()
    if reason is not None:
        return reason
    if not EXT_HAS_CUDA:
        return "raid_fast was built without CUDA (see `raid-fast env` for the build flags)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def build_info() -> dict:
    """The extension's compile-time configuration, or the import error."""
    if _C is None:
        return {"extension": "not available", "error": EXT_IMPORT_ERROR}
    return dict(_C.build_info())
