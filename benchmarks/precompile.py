"""Compiles the Triton kernels of the GPU benchmark steps before they run, several at a time.

A benchmark process compiles each Triton specialisation it meets, one after another, inside its
step's time cap (``benchmarks/device_check.sh``). This records the launches of the target steps'
calls at their real shapes without running or compiling anything (the host launchers' logic only,
``tests.library.triton_aot.Recorder(execute=False)``), then compiles each distinct specialisation
through ``JITFunction.warmup`` in ``--jobs`` processes into the triton cache that the benchmark
processes read: the same specialisations give the same cache keys, so they load instead of
compiling.

Steps (``--steps``, default all): ``kmeans_all`` / ``kmeans_one`` (``bench_kmeans``'s
half-precision fits at ``full15`` / ``full``, its gate's case included), ``retrieval_b1`` /
``retrieval_b32`` (``bench_retrieval`` at ``mvtec448``: the providers ``device_check.sh`` times and
the variants their gate checks), ``table4`` (the retrieval calls of the Table 4 rows at
``mvtec448``). The databases are stand-ins of the benchmarks' shapes (classes, templates, tokens,
prototypes), not built: only shapes decide launches.

``python -m benchmarks.precompile [--jobs 16] [--list FILE]`` on a GPU machine compiles (``--list``
also writes the launches to FILE). On a CPU, under ``TRITON_INTERPRET=1``, it only records them,
planned for an H200 (triton is forced for the recorded calls, which auto selection never picks
there), for ``python -m tests.library.triton_aot`` to compile for sm_90 and time; ``--size small``
uses the CI-sized workloads (a rehearsal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import raid_fast as rf
from benchmarks import bench_kmeans, bench_retrieval
from tests.library import triton_aot

STEPS = ("kmeans_all", "retrieval_b1", "retrieval_b32", "table4", "kmeans_one")
# flat search settings of bench_retrieval's GPU providers: (kernel module, switch, value) pairs
FLAT_VARIANTS = {
    "": (),
    "_tf32x3": (("cosine_topk", "DOT_PRECISION", "tf32x3"),),
    "_filter": (("cosine_filter", "FLAT_SEARCH", "filter"),),
    "_filter_tf32x3": (("cosine_filter", "FLAT_SEARCH", "filter"), ("cosine_topk", "DOT_PRECISION", "tf32x3")),
    "_filter_fp16": (("cosine_filter", "FLAT_SEARCH", "filter_fp16"),),
}


@contextmanager
def kernel_settings(settings):
    """The module-level switches of raid_fast.kernels set while the block runs."""
    import importlib

    mods = [(importlib.import_module(f"raid_fast.kernels.{m}"), name, value) for m, name, value in settings]
    for mod, name, value in mods:
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, _ in mods:
            setattr(mod, name, None)


def stand_in_database(classes: int, templates: int, tokens_per_image: int, dim: int, n_semantic: int, device: str):
    """A TokenDatabase of the benchmarks' shapes: random prototypes (routing reads them on the host)
    and unwritten tokens (no kernel runs), lists of near-equal sizes."""
    gen = torch.Generator().manual_seed(0)
    n = classes * templates * tokens_per_image
    n_lists = classes * n_semantic
    return rf.TokenDatabase(
        class_prototypes=F.normalize(torch.randn(classes, dim, generator=gen), dim=-1).to(device),
        semantic_prototypes=F.normalize(torch.randn(classes, n_semantic, dim, generator=gen), dim=-1).to(device),
        n_semantic=torch.full((classes,), n_semantic, dtype=torch.int64, device=device),
        tokens=torch.empty(n, dim, device=device),
        list_offsets=(torch.arange(n_lists + 1) * n // n_lists).to(device),
        token_image=torch.empty(n, dtype=torch.int64, device=device),
        token_pos=torch.empty(n, dtype=torch.int64, device=device),
        image_class=(torch.arange(classes * templates) // templates).to(device),
    )


def _retrieval(w, device: str, providers: list[str]) -> None:
    db = stand_in_database(w.classes, w.templates, w.tokens_per_image, w.dim, w.n_semantic, device)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(w.batch, w.tokens_per_image, w.dim, generator=gen).to(device)  # [B, L, D]
    qc = (db.class_prototypes[0].cpu() + 0.1 * torch.randn(w.batch, w.dim, generator=gen)).to(device)  # [B, D]
    single = db.classify(qc)
    for provider in providers:
        mode = "hierarchical" if provider.startswith("hierarchical") else "flat"
        scope = provider.removeprefix("hierarchical").removeprefix("flat_single").removeprefix("flat_multi")
        class_ids = single if provider.startswith("flat_single") else None
        with kernel_settings(FLAT_VARIANTS[scope]):
            res = rf.retrieve(q, db, query_cls=qc, class_ids=class_ids, k=w.k, nprobe=w.nprobe, mode=mode)
            res.cost_volume(w.grid, w.grid)


def retrieval_providers(batch: int) -> list[str]:
    """What device_check.sh times at this batch, and the variants bench_retrieval's gate checks."""
    if batch == 1:
        flat = [f"flat_{scope}{variant}" for variant in FLAT_VARIANTS for scope in ("single", "multi")]
        return ["hierarchical", *flat]
    return ["hierarchical", "hierarchical_tf32x3", "flat_single", "flat_multi", "flat_single_tf32x3"]


def _kmeans(size: str, device: str) -> None:
    # bench_kmeans's fits (its gate's case too) on unit points of the same shapes, drawn on the
    # device: bench_kmeans.make_data draws them on the host, seconds at the full size
    gate = bench_kmeans.Workload(groups=2, n=3000, d=64, k=12, niter=4)  # bench_kmeans.gate's case
    for w in (gate, bench_kmeans.WORKLOADS[size]):
        x = F.normalize(torch.randn(w.groups, w.n, w.d, device=device), dim=-1)  # [G, N, D]
        init = x[:, : w.k].clone()  # [G, k, D]
        for precision in bench_kmeans.HALF.values():
            rf.kmeans(x, w.k, niter=w.niter, init_centroids=init, precision=precision, backend="triton")


def _table4(size: str, device: str) -> None:
    from benchmarks import table4

    scale = table4.SCALES[size]
    gen = torch.Generator().manual_seed(2)
    for templates in (scale.templates, min(4, scale.templates)):
        db = stand_in_database(scale.classes, templates, scale.grid**2, scale.dim, scale.n_semantic, device)
        tokens = torch.randn(1, scale.grid**2, scale.dim, generator=gen).to(device)  # [1, L, D] as the backbone's
        cls = torch.randn(1, scale.dim, generator=gen).to(device)
        routed = db.classify(cls)
        for row in table4.ROWS:
            if (row.capacity == "4-shot") != (templates < scale.templates):
                continue
            class_ids = routed if row.capacity == "single" else None
            res = rf.retrieve(
                tokens, db, query_cls=cls, class_ids=class_ids, k=row.k, nprobe=scale.nprobe, mode=row.retrieval
            )
            res.cost_volume(scale.grid, scale.grid)
            # Detector.predict passes the token grid, which fuses the volume into the search
            grid = tokens.transpose(1, 2).reshape(1, scale.dim, scale.grid, scale.grid)
            rf.retrieve(grid, db, query_cls=cls, class_ids=class_ids, k=row.k, nprobe=scale.nprobe, mode=row.retrieval)


def record(step: str, size: str, device: str) -> list[dict]:
    """The launches of one step's calls, recorded without running them (planned for an H200 on a CPU)."""
    calls = {
        "kmeans_all": lambda: _kmeans("small15" if size == "small" else "full15", device),
        "kmeans_one": lambda: _kmeans("small" if size == "small" else "full", device),
        "retrieval_b1": lambda: _retrieval(
            bench_retrieval.Workload(**{**bench_retrieval.WORKLOADS[size_of(size)].__dict__, "batch": 1}),
            device,
            retrieval_providers(1),
        ),
        "retrieval_b32": lambda: _retrieval(
            bench_retrieval.Workload(**{**bench_retrieval.WORKLOADS[size_of(size)].__dict__, "batch": 32}),
            device,
            retrieval_providers(32),
        ),
        "table4": lambda: _table4("small" if size == "small" else "mvtec448", device),
    }
    on_cpu = device == "cpu"
    saved = os.environ.get("RAID_FAST_BACKEND")
    with triton_aot.Recorder(plan_sms=triton_aot.H200_SMS if on_cpu else None, execute=False) as recorder:
        if on_cpu:
            # interpreted triton only serves explicit requests; every op with a triton backend takes it
            os.environ["RAID_FAST_BACKEND"] = "triton"
        try:
            calls[step]()
        finally:
            if saved is None:
                os.environ.pop("RAID_FAST_BACKEND", None)
            else:
                os.environ["RAID_FAST_BACKEND"] = saved
    # compiled runs sort with tl.topk, and their other settings are what the benchmarks chose
    launches = (
        triton_aot.gpu_launches(recorder.launches, native_sort=(True,)) if on_cpu else _distinct(recorder.launches)
    )
    for launch in launches:
        launch["steps"] = [step]
    return launches


def size_of(size: str) -> str:
    return "small" if size == "small" else "mvtec448"


def _distinct(launches: list[dict]) -> list[dict]:
    seen, out = set(), []
    for launch in launches:
        key = triton_aot.jit_key(launch)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def merge_steps(per_step: list[list[dict]]) -> list[dict]:
    """Every distinct launch once, in step order, with the steps that launch it."""
    out: dict[str, dict] = {}
    for launches in per_step:
        for launch in launches:
            key = triton_aot.jit_key(launch)
            if key in out:
                out[key]["steps"] += [s for s in launch["steps"] if s not in out[key]["steps"]]
            else:
                out[key] = launch
    return list(out.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--list", default=None, help="also write the launches to this JSON file")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; known: {list(STEPS)}")
    start = time.perf_counter()
    launches = merge_steps([record(step, args.size, args.device) for step in steps])
    counts = {step: sum(step in launch["steps"] for launch in launches) for step in steps}
    print(f"precompile: {len(launches)} specialisations ({counts}) recorded in {time.perf_counter() - start:.1f}s")
    if args.list:
        with open(args.list, "w") as f:
            json.dump(launches, f)
    if args.device == "cpu":
        print("precompile: no GPU, nothing compiled (python -m tests.library.triton_aot compiles the list for sm_90)")
        return 0
    start = time.perf_counter()
    results = triton_aot.compile_all(launches, arch=None, jobs=args.jobs)
    failures = [r for r in results if len(r) == 2]
    for launch, error in failures:
        print(f"precompile: {launch['kernel']} failed: {error[:500]}")
    seconds = sum(r[3] for r in results if len(r) == 5)
    print(
        f"precompile: {len(results) - len(failures)} compiled in {time.perf_counter() - start:.1f}s "
        f"on {args.jobs} processes ({seconds:.0f} CPU seconds), {len(failures)} failed"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
