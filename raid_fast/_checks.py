"""Input validation shared by every public op: one place, one wording.

Messages name the argument, the expectation and the value received. ``ValueError`` for shapes and
values, ``TypeError`` for types and dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch


def as_tensor(name: str, value: Any) -> torch.Tensor:
    """Accepts a tensor or a numpy array (shared memory, no copy); anything else is a TypeError."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    msg = f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}"
    raise TypeError(msg)


def check_ndim(name: str, t: torch.Tensor, ndims: Iterable[int], layout: str) -> None:
    ndims = tuple(ndims)
    if t.dim() not in ndims:
        msg = f"{name} must be {layout}, got a {t.dim()}-d tensor of shape {tuple(t.shape)}"
        raise ValueError(msg)


def check_floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        msg = f"{name} must be a floating-point tensor (float32 is used), got dtype {t.dtype}"
        raise TypeError(msg)


def check_dtype(name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        msg = f"{name} must have dtype {expected}, got {t.dtype}"
        raise TypeError(msg)


def data_checks() -> bool:
    """Whether checks that read tensor values run: always in eager mode; not while torch.compile or
    torch.export trace a graph (a value read there is a data-dependent guard or a graph break), where
    shape checks still run. Eager calls keep every error."""
    return not torch.compiler.is_compiling()


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raises ValueError when ``t`` holds NaN or inf (eager only, see :func:`data_checks`).

    A plain sum decides in the common case (any NaN or inf makes it non-finite, and it runs at
    memory speed where ``torch.isfinite(t).all()`` does not); only a non-finite sum, which may also
    be an overflow of large finite values, runs the element-wise count.
    """
    if t.numel() == 0 or not data_checks():
        return
    # this is a CPU-GPU sync point, once per call at the public boundary; the finiteness test of the
    # sum runs on the host (one launch fewer than torch.isfinite on a 0-d tensor)
    if math.isfinite(t.sum().item()):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        msg = f"{name} must be finite, got {bad} NaN/inf value(s) in a tensor of shape {tuple(t.shape)}"
        raise ValueError(msg)


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        msg = f"all tensors must be on one device, got {listing}"
        raise ValueError(msg)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        msg = f"{name} must be an int, got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    value = int(value)
    if minimum is not None and value < minimum:
        msg = f"{name} must be >= {minimum}, got {value}"
        raise ValueError(msg)
    if maximum is not None and value > maximum:
        msg = f"{name} must be <= {maximum}, got {value}"
        raise ValueError(msg)
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        msg = f"{name} must be one of {list(choices)}, got {value!r}"
        raise ValueError(msg)


def check_directions(name: str, t: torch.Tensor, row: str = "row") -> None:
    """Raises ValueError unless every row of ``t`` [R, D] is a direction that can be normalised:
    finite, not all zero (a zero vector has no direction) and small enough that its squared norm
    fits in float32. The message names the first bad row as ``<row> <index>`` (eager only, see
    :func:`data_checks`).
    """
    if t.numel() == 0 or not data_checks():
        return
    peak = t.detach().abs().amax(dim=1).float()  # [R]; NaN propagates, inf stays inf
    # this is a CPU-GPU sync point, once per call at the public boundary
    values = peak.tolist()
    limit = math.sqrt(torch.finfo(torch.float32).max / max(1, t.shape[1]))
    for i, v in enumerate(values):
        if not math.isfinite(v):
            msg = f"{name} must be finite, got NaN/inf values at {row} {i}"
            raise ValueError(msg)
        if v == 0.0:
            msg = f"{name} must have a direction for every {row}, got an all-zero vector at {row} {i}"
            raise ValueError(msg)
        if v > limit:
            msg = f"{name} is too large to normalise in float32 at {row} {i} (max |x| = {v:.4g}); rescale it"
            raise ValueError(msg)
