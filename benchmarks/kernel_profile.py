"""Where the time goes: torch.profiler over the hot paths, one table per case.

Cases (``--scale full``: the ``mvtec448`` workloads; ``small``: CI-sized stand-ins for a rehearsal):
``retrieve_b1`` / ``retrieve_b32`` (hierarchical retrieve + cost volume: the 150 us batch-1 and
50 us/image batch-32 targets), ``flat_b1`` (flat multi-class; ``flat_filter_b1`` and
``flat_filter_fp16_b1`` the same with the threshold-filtered search, where triton serves it),
``lloyd_fp16`` / ``lloyd_fp32`` (one Lloyd iteration over every class: the triton half-precision
step and the float32 step of the auto backend). For each: the wall time per call, kernel launches
per call, and the operators and kernels sorted by their own device time (CPU time on a CPU),
written as one text report.

Timing comes from the benchmarks proper; this says which kernel or which host gap to attack next.
``python -m benchmarks.kernel_profile --device cuda --scale full --out benchmarks/results``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import raid_fast as rf
from benchmarks import _bench, bench_kmeans, bench_retrieval
from raid_fast import _dispatch
from raid_fast._ragged import Groups


def _cases(device: str, scale: str) -> dict:
    """name -> zero-argument callable running one call of the case."""
    full = scale == "full"
    w = bench_retrieval.WORKLOADS["mvtec448" if full else "small"]
    cases = {}
    for batch in (1, 32):
        wb = bench_retrieval.Workload(**{**w.__dict__, "batch": batch})
        db, q, qc = bench_retrieval.make_database(wb, device)

        def retrieve(db=db, q=q, qc=qc, wb=wb):
            res = rf.retrieve(q, db, query_cls=qc, k=wb.k, nprobe=wb.nprobe)
            return res.cost_volume(wb.grid, wb.grid)

        cases[f"retrieve_b{batch}"] = retrieve
    db, q, qc = bench_retrieval.make_database(w, device)
    cases["flat_b1"] = lambda: rf.retrieve(q, db, query_cls=qc, k=w.k, mode="flat").cost_volume(w.grid, w.grid)
    if rf.backends()["cosine_topk"].get("triton") == "ok":
        for search in ("filter", "filter_fp16"):
            cases[f"flat_{search}_b1"] = bench_retrieval._with_kernel_setting(
                cases["flat_b1"], "cosine_filter", "FLAT_SEARCH", search
            )

    kw = bench_kmeans.WORKLOADS["full15" if full else "small15"]
    x, init = bench_kmeans.make_data(kw, device)
    values = F.normalize(x.reshape(-1, kw.d), dim=1)  # [G * N, D]
    groups = Groups.uniform(kw.groups, kw.n, values.device)
    steps = {"lloyd_fp32": (values, None)}
    if rf.backends()["kmeans_step"].get("triton") == "ok":
        steps["lloyd_fp16"] = (values.half(), "triton")
    for name, (pts, backend) in steps.items():
        cases[name] = lambda pts=pts, backend=backend: _dispatch.call(
            "kmeans_step", pts, groups.offsets, groups.max_size, init, True, backend=backend
        )
    return cases


def profile_case(name: str, fn, device: str, calls: int = 5, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # warm-up: compilation, caches, allocator
        fn()
    _bench.sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _bench.sync(device)
    wall = (time.perf_counter() - start) / calls

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        _bench.sync(device)
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / calls
    sort_by = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    head = (
        f"== {name}: {wall * 1e6:.1f} us per call (wall, {calls} calls after warm-up), "
        f"{launches:.0f} kernel launches per call\n"
    )
    return head + events.table(sort_by=sort_by, row_limit=rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=["small", "full"], default="small")
    parser.add_argument("--out", default=None, help="folder for profile_<device>.txt")
    args = parser.parse_args(argv)
    report = [f"device: {_bench.device_name(args.device)}; versions: {_bench.versions()}\n"]
    for name, fn in _cases(args.device, args.scale).items():
        text = profile_case(name, fn, args.device)
        print(text, flush=True)
        report.append(text)
    if args.out is not None:
        path = Path(args.out) / f"profile_{_bench.slug(_bench.device_name(args.device))}_{args.scale}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(report))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
