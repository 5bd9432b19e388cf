"""The one backend registry of raid_fast.

Ops declare their argument spec once (:data:`raid_fast.ops.schema.SCHEMAS`). Each backend is one
module that exports ``BACKENDS``, a tuple of :class:`Backend` (a name, a priority, an availability
check and a table ``{op: Impl(fn, supports)}``); this module imports them itself, once, on first
use (:data:`BACKEND_MODULES`): ``torch`` (the references, always available), ``cpp`` and ``cuda``
(the compiled extension), ``triton`` (``raid_fast.kernels``). ``fn`` takes the op's arguments in
schema order; ``supports(args) -> None | reason`` reads them by name (``args.queries``, ``args.k``).

Selection for ``call(op, ..., backend=None, prefer=None)``:

- ``backend`` (strict): that backend or an error. Unknown, unavailable or unable to serve the call
  raises ``RuntimeError`` with the reason and the state of every backend; a backend whose module
  failed to import re-raises that import error.
- ``RAID_FAST_BACKEND`` (environment, strict like ``backend``) applies to every op that has a backend
  of that name; ops without one use auto.
- ``prefer`` (soft): that backend when it can serve the call, else auto. Composite functions
  (``retrieve``, ``kmeans``) pass their ``backend`` on as ``prefer`` to the steps that backend lacks.
- auto: the available backend with the lowest priority that supports the call, logged once per
  (op, backend); backends with ``auto=False`` (interpreted Triton) only serve explicit requests.

Inside ``torch.compile`` / ``torch.export`` tracing, ``call`` emits the registered custom op
``torch.ops.raid_fast.<op>`` instead (:mod:`raid_fast.ops.library`), whose per-device kernels run
this same auto selection when the graph executes.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("raid_fast")

ENV_BACKEND = "RAID_FAST_BACKEND"
# backend name -> the module that exports it (BACKENDS); imported once, on first use
BACKEND_MODULES = {
    "torch": "raid_fast._backends.reference",
    "cpp": "raid_fast._backends.extension",
    "cuda": "raid_fast._backends.extension",
    "triton": "raid_fast.kernels.backend",
}

Reason = str | None


class Args(dict):
    """A call's arguments by schema name; attribute access reads them (``args.queries``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


@dataclass(frozen=True)
class Spec:
    """Argument names and defaults of an op, parsed from its schema."""

    name: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]

    @classmethod
    def parse(cls, name: str, schema: str) -> Spec:
        parsed = torch._C.parse_schema(f"raid_fast::{name}{schema}")
        names = tuple(a.name for a in parsed.arguments)
        defaults = {a.name: a.default_value for a in parsed.arguments if a.has_default_value()}
        return cls(name, names, defaults)

    def bind(self, args: tuple, kwargs: dict) -> Args:
        if len(args) > len(self.names):
            msg = f"{self.name}() takes {len(self.names)} arguments ({', '.join(self.names)}), got {len(args)}"
            raise TypeError(msg)
        bound = Args(zip(self.names, args))
        for key, value in kwargs.items():
            if key not in self.names or key in bound:
                msg = f"{self.name}() got an unexpected or repeated argument {key!r}; arguments: {self.names}"
                raise TypeError(msg)
            bound[key] = value
        for key in self.names[len(bound) :]:
            if key not in bound:
                if key not in self.defaults:
                    msg = f"{self.name}() is missing the argument {key!r}"
                    raise TypeError(msg)
                bound[key] = self.defaults[key]
        return bound

    def values(self, bound: Args) -> tuple:
        """The bound arguments in schema order (what backend functions take)."""
        return tuple(bound[n] for n in self.names)


def _always() -> Reason:
    return None


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op: ``fn(*args in schema order)`` and an optional
    ``supports(args) -> None | reason`` checked per call (device, dtype, size limits)."""

    fn: Callable[..., Any]
    supports: Callable[[Args], Reason] | None = None


@dataclass
class Backend:
    """A backend: its ops, its rank in auto selection (lower first) and whether it can run here.

    ``available() -> None | reason`` is checked once per process (build flags, devices); an
    exception in it becomes the reason, it never breaks the caller.
    """

    name: str
    priority: int
    impls: Mapping[str, Impl]
    available: Callable[[], Reason] = _always
    auto: bool = True
    _availability: Any = field(default=None, init=False, repr=False)
    _checked: bool = field(default=False, init=False, repr=False)

    def availability(self) -> Reason:
        if not self._checked:
            try:
                self._availability = self.available()
            except Exception as exc:  # a broken optional backend must not break the caller
                self._availability = f"availability check failed: {exc!r}"
            self._checked = True
        return self._availability

    def reason(self, op: str, args: Args) -> Reason:
        """Why this backend cannot run ``op`` on these arguments, or None."""
        impl = self.impls.get(op)
        if impl is None:
            return f"has no {op}"
        reason = self.availability()
        if reason is None and impl.supports is not None:
            reason = impl.supports(args)
        return reason


_SPECS: dict[str, Spec] = {}
_BACKENDS: dict[str, Backend] = {}
_IMPORT_ERRORS: dict[str, BaseException] = {}
_LOGGED: set[tuple[str, str]] = set()
_loaded = False


def define(name: str, schema: str) -> None:
    """Declares an op's argument spec (the ops of :data:`raid_fast.ops.schema.SCHEMAS` are declared
    on first use; third-party ops add theirs here)."""
    _SPECS[name] = Spec.parse(name, schema)


def add_backend(backend: Backend) -> None:
    """Registers a backend (replacing one of the same name)."""
    _BACKENDS[backend.name] = backend


def remove_backend(name: str) -> None:
    _BACKENDS.pop(name, None)


def _load() -> None:
    """Declares the built-in ops and imports every backend module once. A module that fails to
    import leaves its backends out, with the error kept for explicit requests."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from raid_fast.ops.schema import SCHEMAS

    for name, schema in SCHEMAS.items():
        _SPECS.setdefault(name, Spec.parse(name, schema))
    for module in dict.fromkeys(BACKEND_MODULES.values()):
        try:
            backends = importlib.import_module(module).BACKENDS
        except Exception as exc:  # an optional backend that cannot import must not break raid_fast
            for name, mod in BACKEND_MODULES.items():
                if mod == module:
                    _IMPORT_ERRORS[name] = exc
            continue
        for backend in backends:
            _BACKENDS.setdefault(backend.name, backend)


def spec(op: str) -> Spec:
    _load()
    if op not in _SPECS:
        msg = f"unknown op {op!r}; registered ops: {sorted(_SPECS)}"
        raise RuntimeError(msg)
    return _SPECS[op]


def _ordered(op: str) -> list[Backend]:
    return sorted((b for b in _BACKENDS.values() if op in b.impls), key=lambda b: b.priority)


def _describe(op: str, args: Args) -> str:
    parts = [f"{b.name}: {b.reason(op, args) or 'ok'}" for b in _ordered(op)]
    parts += [f"{name}: failed to import ({exc!r})" for name, exc in _IMPORT_ERRORS.items()]
    return "Backends for this call: " + "; ".join(parts)


def _strict(op: str, name: str, source: str, args: Args) -> str:
    backend = _BACKENDS.get(name)
    if backend is None:
        if name in _IMPORT_ERRORS:
            # Liger's rule: an explicitly requested backend that failed to import re-raises the real error
            raise _IMPORT_ERRORS[name]
        msg = f"{op}: {source}={name!r} is not a registered backend; registered: {[b.name for b in _ordered(op)]}"
        raise RuntimeError(msg)
    if op not in backend.impls:
        msg = f"{op}: {source}={name!r} has no {op}; " + _describe(op, args)
        raise RuntimeError(msg)
    reason = backend.reason(op, args)
    if reason is not None:
        msg = f"{op}: backend {name!r} cannot serve this call: {reason}. " + _describe(op, args)
        raise RuntimeError(msg)
    return name


def _select(op: str, args: Args, backend: str | None, prefer: str | None) -> str:
    if backend is not None:
        return _strict(op, backend, "backend", args)
    env = os.environ.get(ENV_BACKEND) or None
    if env is not None and (env not in _BACKENDS or op in _BACKENDS[env].impls):
        return _strict(op, env, ENV_BACKEND, args)
    if prefer is not None and prefer in _BACKENDS and _BACKENDS[prefer].reason(op, args) is None:
        return prefer
    for candidate in _ordered(op):
        if candidate.auto and candidate.reason(op, args) is None:
            if (op, candidate.name) not in _LOGGED:
                _LOGGED.add((op, candidate.name))
                logger.info("raid_fast: %s -> %s", op, candidate.name)
            return candidate.name
    msg = f"{op}: no backend can serve this call. " + _describe(op, args)
    raise RuntimeError(msg)


def select(op: str, *args: Any, backend: str | None = None, prefer: str | None = None, **kwargs: Any) -> str:
    """The name of the backend that ``call`` would run for these arguments."""
    return _select(op, spec(op).bind(args, kwargs), backend, prefer)


def call(op: str, *args: Any, backend: str | None = None, prefer: str | None = None, **kwargs: Any) -> Any:
    """Runs ``op`` on the selected backend (see the module docstring)."""
    s = spec(op)
    bound = s.bind(args, kwargs)
    if torch.compiler.is_compiling():
        from raid_fast.ops import library

        return library.op(op)(*s.values(bound))
    name = _select(op, bound, backend, prefer)
    return _BACKENDS[name].impls[op].fn(*s.values(bound))


def backends() -> dict[str, dict[str, str]]:
    """``{op: {backend: "ok" | reason}}`` for every op (availability here, not per call)."""
    _load()
    table: dict[str, dict[str, str]] = {}
    for op in sorted(_SPECS):
        row = {}
        for b in _ordered(op):
            reason = b.availability()
            if reason is None and not b.auto:
                reason = "ok (explicit requests only)"
            row[b.name] = reason or "ok"
        for name, exc in _IMPORT_ERRORS.items():
            row.setdefault(name, f"failed to import: {type(exc).__name__}: {exc}")
        table[op] = row
    return table
