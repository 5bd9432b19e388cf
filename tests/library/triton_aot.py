"""Ahead-of-time compilation of recorded Triton launches for a GPU target, without a GPU.

Run as ``python -m tests.library.triton_aot`` with ``TRITON_INTERPRET`` unset (so that ``@triton.jit``
gives real JIT functions) and a JSON list of launches on stdin, as written by
``tests/test_triton_compile.py``: ``{"kernel": "module:function", "args": {name: spec}, "options":
{"num_warps": ...}}`` where a spec
is ``["ptr", dtype, aligned]``, ``["int", value]``, ``["float", value]`` or ``["value", value]`` (None,
bool, constexpr). Arguments are specialised as the JIT would: an int equal to 1 becomes a constant,
16-byte aligned pointers and ints divisible by 16 get the divisibility hint (which decides load
vectorisation, hence registers and shared memory). Prints one JSON line: ``{"compiled": n,
"failures": [[launch, error], ...], "kernels": [[kernel, shared bytes, spill bytes or None], ...]}``;
spill bytes come from ``ptxas -v`` when triton's ptxas is found.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tempfile

POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int64": "*i64", "int32": "*i32"}


def signature_of(fn, args: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a JITFunction for recorded argument specs."""
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        kind, value, *extra = args[param.name]
        divisible = False
        if param.is_constexpr or kind == "value" or (kind == "int" and value == 1):
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif kind == "ptr":
            signature[param.name] = POINTER_TYPES[value]
            divisible = bool(extra and extra[0])
        elif kind == "int":
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        elif kind == "float":
            signature[param.name] = "fp32"
        else:
            msg = f"unknown argument spec {kind!r} for {param.name}"
            raise ValueError(msg)
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def spill_bytes(ptx: str) -> int | None:
    """Spill stores reported by triton's own ptxas for sm_90a, or None if it cannot be run."""
    import os

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        proc = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True
        )
    found = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    return sum(int(v) for v in found) if proc.returncode == 0 and found else None


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = json.load(sys.stdin)
    target = GPUTarget("cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 90, 32)
    failures, compiled, kernels = [], 0, []
    for launch in launches:
        module, name = launch["kernel"].split(":")
        fn = getattr(importlib.import_module(module), name)
        try:
            signature, constexprs, attrs = signature_of(fn, launch["args"])
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            kernel = triton.compile(src, target=target, options=launch.get("options") or None)
            if not kernel.asm.get("cubin"):
                failures.append([launch, "no cubin produced"])
            compiled += 1
            kernels.append([launch, kernel.metadata.shared, spill_bytes(kernel.asm["ptx"])])
        except Exception as exc:  # report every failing specialisation, not only the first
            failures.append([launch, f"{type(exc).__name__}: {str(exc)[:2000]}"])
    print(json.dumps({"compiled": compiled, "failures": failures, "kernels": kernels}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
