"""The one backend registry of raid_fast.

Every op (``kmeans_assign``, ``kmeans_update``, ...) registers a ``torch`` reference, always
available, and optional fast backends (``cpp``, ``cuda``, ``triton``). A registration gives
``available() -> None | reason`` (checked once per process: build flags, imports) and
``supports(*args, **kwargs) -> None | reason`` (checked per call: device, dtype, sizes).

Selection for ``call(op, ..., backend=None)``: the explicit ``backend`` argument, else the
``RAID_FAST_BACKEND`` environment variable, else auto. Auto takes the first backend in priority
order that is available and supports the call, logs the choice once per (op, backend), and never
picks interpreted Triton. An explicit choice that is unknown, unavailable or cannot serve the call
raises ``RuntimeError`` with the reason and the registered backends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("raid_fast")

ENV_BACKEND = "RAID_FAST_BACKEND"
KNOWN_BACKENDS = ("torch", "cpp", "cuda", "triton")

Reason = str | None


@dataclass
class _Impl:
    fn: Callable[..., Any]
    priority: int
    available: Callable[[], Reason]
    supports: Callable[..., Reason]
    auto: bool = True
    _cached_available: Any = field(default=None, repr=False)
    _checked: bool = field(default=False, repr=False)

    def availability(self) -> Reason:
        if not self._checked:
            try:
                self._cached_available = self.available()
            except Exception as exc:  # a broken optional backend must not break import
                self._cached_available = f"availability check failed: {exc!r}"
            self._checked = True
        return self._cached_available


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_LOGGED: set[tuple[str, str]] = set()


def _always() -> Reason:
    return None


def _any_call(*args: Any, **kwargs: Any) -> Reason:
    return None


def register(
    op: str,
    backend: str,
    fn: Callable[..., Any],
    *,
    priority: int,
    available: Callable[[], Reason] = _always,
    supports: Callable[..., Reason] = _any_call,
    auto: bool = True,
) -> None:
    """Registers ``fn`` as ``backend`` of ``op``; lower ``priority`` is tried first in auto mode.

    ``auto=False`` keeps a backend out of auto selection (interpreted Triton) while an explicit
    request can still use it.
    """
    if backend not in KNOWN_BACKENDS:
        msg = f"backend must be one of {KNOWN_BACKENDS}, got {backend!r}"
        raise ValueError(msg)
    _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, priority, available, supports, auto)


def load_optional_backends() -> None:
    """Registers the triton backends (``raid_fast.kernels`` imports triton, guarded there); cheap
    after the first call. Ops call it lazily so that ``import raid_fast`` never imports triton."""
    try:
        import raid_fast.kernels  # noqa: F401
    except ImportError:
        pass


def _ordered(op: str) -> list[tuple[str, _Impl]]:
    return sorted(_REGISTRY[op].items(), key=lambda item: item[1].priority)


def _lookup(op: str) -> dict[str, _Impl]:
    if op not in _REGISTRY:
        msg = f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}"
        raise RuntimeError(msg)
    return _REGISTRY[op]


def select(op: str, *args: Any, backend: str | None = None, **kwargs: Any) -> str:
    """Returns the name of the backend that ``call`` would run for these arguments."""
    impls = _lookup(op)
    requested = backend if backend is not None else (os.environ.get(ENV_BACKEND) or None)
    if requested is not None:
        source = "backend" if backend is not None else ENV_BACKEND
        if requested not in impls:
            msg = (
                f"{op}: {source}={requested!r} is not a registered backend; "
                f"registered: {[name for name, _ in _ordered(op)]}"
            )
            raise RuntimeError(msg)
        impl = impls[requested]
        reason = impl.availability() or impl.supports(*args, **kwargs)
        if reason is not None:
            msg = f"{op}: backend {requested!r} cannot serve this call: {reason}. " + _describe(op, *args, **kwargs)
            raise RuntimeError(msg)
        return requested
    for name, impl in _ordered(op):
        if not impl.auto or impl.availability() is not None:
            continue
        if impl.supports(*args, **kwargs) is None:
            if (op, name) not in _LOGGED:
                _LOGGED.add((op, name))
                logger.info("raid_fast: %s -> %s", op, name)
            return name
    msg = f"{op}: no backend can serve this call. " + _describe(op, *args, **kwargs)
    raise RuntimeError(msg)


def call(op: str, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
    """Runs ``op`` on the selected backend (see the module docstring)."""
    name = select(op, *args, backend=backend, **kwargs)
    return _REGISTRY[op][name].fn(*args, **kwargs)


def _describe(op: str, *args: Any, **kwargs: Any) -> str:
    parts = []
    for name, impl in _ordered(op):
        reason = impl.availability() or impl.supports(*args, **kwargs)
        parts.append(f"{name}: {'ok' if reason is None else reason}")
    return "Backends for this call: " + "; ".join(parts)


def backends() -> dict[str, dict[str, str]]:
    """``{op: {backend: "ok" | reason}}`` for every registered op (availability, not per call)."""
    table: dict[str, dict[str, str]] = {}
    for op in sorted(_REGISTRY):
        table[op] = {}
        for name, impl in _ordered(op):
            reason = impl.availability()
            if reason is None and not impl.auto:
                reason = "ok (explicit requests only)"
            table[op][name] = "ok" if reason is None else reason
    return table
