"""Ahead-of-time compilation of recorded Triton launches for a GPU target, without a GPU.

Run as ``python -m tests.triton_aot`` with ``TRITON_INTERPRET`` unset (so that ``@triton.jit``
gives real JIT functions) and a JSON list of launches on stdin, as written by
``tests/test_triton_compile.py``: ``{"kernel": "module:function", "args": {name: spec}, "options":
{"num_warps": ...}}`` where a spec
is ``["ptr", dtype]``, ``["int", value]``, ``["float", value]`` or ``["value", value]`` (None, bool,
constexpr). Prints one JSON line: ``{"compiled": n, "failures": [[launch, error], ...]}``.
"""

from __future__ import annotations

import importlib
import json
import sys

POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int64": "*i64", "int32": "*i32"}


def signature_of(fn, args: dict) -> tuple[dict, dict]:
    """(signature, constexprs) of a JITFunction for recorded argument specs."""
    signature, constexprs = {}, {}
    for param in fn.params:
        kind, value = args[param.name]
        if param.is_constexpr or kind == "value":
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif kind == "ptr":
            signature[param.name] = POINTER_TYPES[value]
        elif kind == "int":
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif kind == "float":
            signature[param.name] = "fp32"
        else:
            msg = f"unknown argument spec {kind!r} for {param.name}"
            raise ValueError(msg)
    return signature, constexprs


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = json.load(sys.stdin)
    target = GPUTarget("cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 90, 32)
    failures, compiled = [], 0
    for launch in launches:
        module, name = launch["kernel"].split(":")
        fn = getattr(importlib.import_module(module), name)
        try:
            signature, constexprs = signature_of(fn, launch["args"])
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            kernel = triton.compile(src, target=target, options=launch.get("options") or None)
            if not kernel.asm.get("cubin"):
                failures.append([launch, "no cubin produced"])
            compiled += 1
        except Exception as exc:  # report every failing specialisation, not only the first
            failures.append([launch, f"{type(exc).__name__}: {str(exc)[:2000]}"])
    print(json.dumps({"compiled": compiled, "failures": failures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
