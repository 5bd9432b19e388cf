"""The Triton kernels compiled for the H200 (sm_90) on a machine without a GPU.

The interpreter that runs the other triton tests here accepts code that the compiler rejects
(types, constexpr use, layouts). This test records every kernel launch of representative public-op
calls under the interpreter, then compiles each recorded specialisation ahead of time for sm_90 in a
process without ``TRITON_INTERPRET``, with both sort variants (``NATIVE_SORT`` on and off), and
fails on any compile error. On a GPU the compiled kernels run in the other tests instead.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import make_lists, unit

pytestmark = pytest.mark.triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _spec(value):
    if isinstance(value, torch.Tensor):
        return ["ptr", str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool) or value is None:
        return ["value", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    return ["value", getattr(value, "value", value)]  # tl.constexpr


def record_launches(monkeypatch) -> list:
    """Patches the interpreter so that every launch is recorded as ``{"kernel", "args"}`` specs."""
    import inspect

    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        # launch options (num_warps, num_stages, ...) are not kernel parameters
        params = set(inspect.signature(self.fn).parameters)
        options = {k: v for k, v in kwargs.items() if k not in params}
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
        launches.append(
            {
                "kernel": f"{self.fn.__module__}:{self.fn.__name__}",
                "args": {name: _spec(v) for name, v in bound.arguments.items()},
                "options": options,
            }
        )
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return launches


def exercise_public_ops() -> None:
    """Small calls covering the kernels' specialisations: ranges, groups, K from 7 to 256, the fused
    cost volume and the stand-alone one."""
    from raid_fast import ops

    q, t = unit(9, 24), unit(70, 24)
    for k in (7, 50, 100, 150, 256):  # every launch configuration of topk_config (K_PAD 16 to 256)
        ops.cosine_topk(q, t, k, backend="triton")
    lo, hi = torch.zeros(9, dtype=torch.int64), torch.full((9,), 40, dtype=torch.int64)
    group = torch.arange(70) % 5
    ops.cosine_topk(q, t, 7, lo, hi, group, torch.arange(9) % 5, backend="triton")
    offsets, tokens = make_lists([5, 0, 30, 12], 24)
    probes = torch.tensor([[0, 2], [2, -1], [3, 1]]).repeat(3, 1)  # [9, 2]
    ops.ivf_topk(q, probes, offsets, tokens, 7, backend="triton")
    ops.ivf_topk(q, probes, offsets, tokens, 150, torch.arange(47) % 4, torch.arange(9) % 4, backend="triton")
    ops.ivf_topk_cost_volume(q, probes, offsets, tokens, 7, None, None, 1, 3, 3, 1.0, backend="triton")
    ops.cost_volume(torch.rand(2, 6, 5), 2, 3, backend="triton")


def _variants(launches: list) -> list:
    """Unique launches, each also with the other sort variant where the kernel has one."""
    out, seen = [], set()
    for launch in launches:
        options = [launch]
        if "NATIVE_SORT" in launch["args"]:
            other = json.loads(json.dumps(launch))
            other["args"]["NATIVE_SORT"] = ["value", not launch["args"]["NATIVE_SORT"][1]]
            options.append(other)
        for option in options:
            key = json.dumps(option, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(option)
    return out


@pytest.mark.skipif(not INTERPRETED, reason="on a GPU the kernels compile and run in the other triton tests")
def test_kernels_compile_for_sm90(monkeypatch):
    pytest.importorskip("triton")
    launches = record_launches(monkeypatch)
    exercise_public_ops()
    kernels = {launch["kernel"].split(":")[1] for launch in launches}
    assert kernels >= {
        "_cosine_topk_partial_kernel",
        "_topk_merge_kernel",
        "_ivf_topk_scan_kernel",
        "_cost_volume_kernel",
    }
    todo = _variants(launches)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.triton_aot", "90"],
        input=json.dumps(todo),
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = "\n\n".join(f"{f[0]['kernel']} {f[0]['args']}:\n{f[1]}" for f in report["failures"])
    assert not report["failures"], (
        f"{len(report['failures'])} of {len(todo)} specialisations fail to compile:\n{failures}"
    )
    assert report["compiled"] == len(todo)
