"""Ahead-of-time compilation of Triton launches for a GPU target, without a GPU.

A launch is ``{"kernel": "module:function", "args": {name: spec}, "options": {"num_warps": ...}}``
where a spec is ``["ptr", dtype, aligned]``, ``["int", value]``, ``["float", value]`` or
``["value", value]`` (None, bool, constexpr). ``Recorder`` records the launches of calls (planned as
on an H200), running them or not; ``gpu_launches`` turns interpreted launches into the
specialisations a compiled run launches (distinct as the JIT's cache tells them apart);
``compile_launch`` compiles one through the JIT itself (``JITFunction.warmup`` with stand-in
arguments of the recorded dtypes, alignments and values), so its specialisation, and its key in the
triton cache, are those of a real launch. Without a GPU a stand-in driver gives the JIT the target.

Command line, with ``TRITON_INTERPRET`` unset (so that ``@triton.jit`` gives real JIT functions) and a
JSON list of launches on stdin::

    python -m tests.library.triton_aot [--arch 90] [--jobs N] [--fresh-cache] < launches.json

prints one JSON line ``{"compiled": n, "failures": [[launch, error], ...], "kernels": [[launch,
shared bytes, spill bytes, compile seconds, registers per thread], ...]}``. Spill bytes and registers
come from triton's own ``ptxas -v`` (None where it cannot run); compile seconds are the CPU time of
the compile with its ptxas run (wall time would count the other processes on shared cores);
``--fresh-cache`` compiles in an empty cache, so that nothing is read back from an earlier run. On a
GPU machine the same command fills the triton cache for the launches, for the device (``--arch`` is
then the device's).

As a pytest plugin it records what an interpreted test run would compile on a GPU::

    TRITON_INTERPRET=1 python -m pytest -p tests.library.triton_aot --record-launches FILE -m triton tests

writes to FILE the GPU specialisations of every launch, each with the tests that launch it
(``"tests"``), ready for the command line above: the compile work of the triton tests on a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

# streaming multiprocessors of an H200: interpreted calls plan their grids for it while recording
H200_SMS = 132
# constexprs whose interpreted value is not what a compiled run uses -> the values compiled runs launch:
# the KMeans dots run in fp32 only under the interpreter (it computes bf16 products wrongly); compiled
# runs sort with tl.topk / tl.bitonic_merge, and the GPU tests also run the min/max network
COMPILED_CONSTEXPRS = {"DOT_F32": (False,), "NATIVE_SORT": (True, False)}


def spec(value) -> list:
    """The JSON spec of one kernel argument."""
    if isinstance(value, torch.Tensor):
        # the JIT specialises pointers aligned to 16 bytes (as every fresh allocation is)
        return ["ptr", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0]
    if isinstance(value, bool) or value is None:
        return ["value", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    return ["value", getattr(value, "value", value)]  # tl.constexpr


class Recorder:
    """Records every Triton launch as a launch dict (in ``launches``) while active.

    ``execute=False`` records without running or compiling anything: the host launchers' logic runs
    on outputs no kernel wrote (``torch.empty`` gives zeros meanwhile, so that code reading them, a
    bincount of cluster ids, stays valid); only shapes decide the launches. ``plan_sms``: the SM
    count the host launchers plan grids for meanwhile (chunks of the token axis, KMeans splits), so
    that the recorded ints are those of that GPU (None: the device's).
    """

    def __init__(self, plan_sms: int | None = H200_SMS, execute: bool = True):
        self.launches: list[dict] = []
        self.test: str | None = None
        self._plan_sms = plan_sms
        self._execute = execute
        self._saved: list[tuple] = []
        self._plan_saved: int | None = None

    def _record(self, jit_fn, args, kwargs) -> None:
        # launch options (num_warps, num_stages, ...) are not kernel parameters
        signature = inspect.signature(jit_fn.fn)
        options = {k: v for k, v in kwargs.items() if k not in signature.parameters}
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
        launch = {
            "kernel": f"{jit_fn.fn.__module__}:{jit_fn.fn.__name__}",
            "args": {name: spec(v) for name, v in bound.arguments.items()},
            "options": options,
        }
        if self.test is not None:
            launch["tests"] = [self.test]
        self.launches.append(launch)

    def start(self) -> Recorder:
        from raid_fast.kernels import cosine_topk
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        recorder = self
        for cls in (InterpretedFunction, JITFunction):
            real_run = cls.run

            def run(self, *args, grid, warmup, _real_run=real_run, **kwargs):
                recorder._record(self, args, kwargs)
                if not recorder._execute:
                    return None
                return _real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

            self._saved.append((cls, real_run))
            cls.run = run
        self._plan_saved = cosine_topk.PLAN_SMS
        if self._plan_sms is not None:
            cosine_topk.PLAN_SMS = self._plan_sms
        if not self._execute:
            real_empty = torch.empty

            def zeroed_empty(*args, **kwargs):
                return real_empty(*args, **kwargs).zero_()

            self._saved.append((torch, real_empty))
            torch.empty = zeroed_empty
        return self

    def stop(self) -> None:
        from raid_fast.kernels import cosine_topk

        for owner, real in reversed(self._saved):
            if owner is torch:
                torch.empty = real
            else:
                owner.run = real
        self._saved = []
        cosine_topk.PLAN_SMS = self._plan_saved

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def jit_key(launch: dict) -> str:
    """What the JIT's cache tells launches apart by: the kernel, each argument's specialisation
    (constexpr value, pointer dtype and alignment, int width and divisibility, 1 as a constant) and
    the launch options."""
    args = {}
    for name, (kind, value, *extra) in launch["args"].items():
        if kind == "int" and value != 1:
            args[name] = ["int", "i32" if -(2**31) <= value < 2**31 else "i64", value % 16 == 0]
        elif kind == "float":
            args[name] = ["float"]
        else:
            args[name] = [kind, value, *extra]
    return json.dumps([launch["kernel"], args, launch.get("options") or {}], sort_keys=True)


def gpu_launches(launches: list[dict], native_sort: tuple[bool, ...] = (True, False)) -> list[dict]:
    """The distinct specialisations that a compiled run of the recorded launches compiles: each
    launch with ``COMPILED_CONSTEXPRS`` set as compiled runs set them (``NATIVE_SORT``: the values of
    ``native_sort``; (True,) for code that does not choose the network, such as the benchmarks),
    deduplicated by ``jit_key`` (the ``"tests"`` of merged launches are merged too)."""
    compiled = {**COMPILED_CONSTEXPRS, "NATIVE_SORT": native_sort}
    out: dict[str, dict] = {}
    for launch in launches:
        variants = [launch]
        for name, values in compiled.items():
            if name in launch["args"]:
                variants = [{**v, "args": {**v["args"], name: ["value", value]}} for v in variants for value in values]
        for variant in variants:
            key = jit_key(variant)
            if key not in out:
                out[key] = json.loads(json.dumps(variant))
            elif "tests" in variant:
                merged = out[key].setdefault("tests", [])
                merged.extend(t for t in variant["tests"] if t not in merged)
    return list(out.values())


class _Pointer:
    """A stand-in tensor argument: what the JIT specialises a pointer on (dtype, 16-byte alignment)."""

    def __init__(self, dtype: str, aligned: bool):
        self.dtype = getattr(torch, dtype)
        self._ptr = 0 if aligned else 4

    def data_ptr(self) -> int:
        return self._ptr


class _TargetDriver:
    """The part of triton's driver that ``JITFunction.warmup`` asks for, for a GPU that is not here."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def stand_in_args(launch: dict) -> list:
    """Positional arguments that the JIT specialises as it did the recorded ones."""
    out = []
    for kind, value, *extra in launch["args"].values():
        out.append(_Pointer(value, bool(extra and extra[0])) if kind == "ptr" else value)
    return out


def ptxas_report(ptx: str) -> tuple[int | None, int | None]:
    """(spill store bytes, registers per thread) reported by triton's own ptxas for sm_90a; None
    where it cannot be run."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        proc = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True
        )
    if proc.returncode != 0:
        return None, None
    spills = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    registers = re.findall(r"Used (\d+) registers", proc.stderr)
    return (sum(int(v) for v in spills) if spills else None), (max(int(v) for v in registers) if registers else None)


def _cpu_seconds() -> float:
    # this process's CPU time and that of its finished children (triton runs ptxas as one): unlike
    # wall time, it does not grow when other processes share the cores
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def compile_launch(launch: dict, arch: int) -> list:
    """``[launch, shared bytes, spill bytes, compile seconds, registers]``, or ``[launch, error]``."""
    from triton.runtime.driver import driver

    module, name = launch["kernel"].split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        if not torch.cuda.is_available():
            driver.set_active(_TargetDriver(arch))
        start = _cpu_seconds()
        kernel = fn.warmup(*stand_in_args(launch), grid=(1,), **(launch.get("options") or {}))
        seconds = _cpu_seconds() - start
        if not kernel.asm.get("cubin"):
            return [launch, "no cubin produced"]
        spills, registers = ptxas_report(kernel.asm["ptx"])
        return [launch, kernel.metadata.shared, spills, round(seconds, 3), registers]
    except Exception as exc:  # report every failing specialisation, not only the first
        return [launch, f"{type(exc).__name__}: {str(exc)[:2000]}"]


def _compile_star(item: tuple) -> list:
    return compile_launch(*item)


def compile_all(launches: list[dict], arch: int | None = 90, jobs: int = 1) -> list[list]:
    """``compile_launch`` of every launch, in ``jobs`` processes (spawned: a GPU process must not
    fork once CUDA is initialised); ``arch`` None compiles for the local GPU."""
    items = [(launch, arch if arch is not None else 90) for launch in launches]
    if jobs <= 1:
        return [_compile_star(item) for item in items]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_star, items))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile recorded triton launches for a GPU target")
    parser.add_argument("arch_pos", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes")
    parser.add_argument("--fresh-cache", action="store_true", help="compile in an empty triton cache")
    args = parser.parse_args(argv)
    arch = args.arch_pos if args.arch_pos is not None else args.arch
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET must be unset: the interpreter gives no JIT functions to compile")
    launches = json.load(sys.stdin)
    with tempfile.TemporaryDirectory() as cache:
        if args.fresh_cache:
            # read by triton when it first needs the cache, in this process and in the workers
            os.environ["TRITON_CACHE_DIR"] = cache
        results = compile_all(launches, arch, args.jobs)
    failures = [r for r in results if len(r) == 2]
    kernels = [r for r in results if len(r) == 5]
    print(json.dumps({"compiled": len(kernels), "failures": failures, "kernels": kernels}))
    return 0


# --- pytest plugin: -p tests.library.triton_aot --record-launches FILE -------------------------------


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--record-launches",
        metavar="FILE",
        default=None,
        help="write the GPU specialisations of every interpreted triton launch, with their tests, to FILE",
    )


class _RecordingPlugin:
    def __init__(self, path: str):
        self.path = path
        self.recorder = Recorder()

    def pytest_sessionstart(self, session) -> None:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            msg = "--record-launches records interpreted launches: set TRITON_INTERPRET=1"
            raise RuntimeError(msg)
        self.recorder.start()

    def pytest_runtest_setup(self, item) -> None:
        self.recorder.test = item.nodeid

    def pytest_runtest_teardown(self, item) -> None:
        self.recorder.test = None

    def pytest_sessionfinish(self, session) -> None:
        self.recorder.stop()
        with open(self.path, "w") as f:
            json.dump(gpu_launches(self.recorder.launches), f)


def pytest_configure(config) -> None:
    path = config.getoption("--record-launches", default=None)
    if path:
        config.pluginmanager.register(_RecordingPlugin(path), "triton-launch-recorder")


if __name__ == "__main__":
    sys.exit(main())
