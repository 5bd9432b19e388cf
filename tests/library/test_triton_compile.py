"""The Triton kernels compiled for the H200 (sm_90) on a machine without a GPU.

The interpreter that runs the other triton tests here accepts code that the compiler rejects
(types, constexpr use, layouts), and it runs other variants than a GPU does: the KMeans pass with
fp32 dots (``DOT_F32``), the search kernels with the min/max sort network. This test records every
kernel launch of representative public-op calls under the interpreter, planned for an H200's 132
SMs, turns them into the specialisations a compiled run launches (``triton_aot.gpu_launches``: the
tensor-core KMeans dots, both sort networks, ``tl.topk`` included) and compiles each ahead of time
for sm_90 in a process without ``TRITON_INTERPRET``. It fails on any compile error, on shared memory
beyond an H100 / H200 block's, and on register spills in the KMeans pass kernel at D % 16 == 0
(ptxas). The calls include the benchmark shapes (D = 384, K = 150, P = 5, S = 50, 15 classes, KMeans
k = 50), whose kernels the GPU targets are measured on. On a GPU the compiled kernels run in the
other tests instead.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tests.library import triton_aot
from tests.utils import make_lists, unit

pytestmark = pytest.mark.triton

H100_MAX_SHARED = 232448
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# records interpreted launches; on a GPU the kernels compile and run in the other triton tests
INTERPRETED_ONLY = pytest.mark.skipif(not INTERPRETED, reason="records interpreted launches (TRITON_INTERPRET=1)")


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
    # D a multiple of 16, as every real backbone's: the JIT then specialises on alignment, which
    # changes the loads, the registers and the shared memory of the compiled kernels; and every
    # tl.dot precision of the search tiles
    from raid_fast.kernels import cosine_topk

    q, t = unit(9, 32), unit(70, 32)
    offsets, tokens = make_lists([5, 0, 30, 12], 32)
    for precision in cosine_topk.DOT_PRECISIONS:
        cosine_topk.DOT_PRECISION = precision
        try:
            ops.cosine_topk(q, t, 150, backend="triton")
            ops.ivf_topk(q, probes, offsets, tokens, 150, backend="triton")
        finally:
            cosine_topk.DOT_PRECISION = None
    ops.ivf_topk_cost_volume(q, probes, offsets, tokens, 150, None, None, 1, 3, 3, 1.0, backend="triton")
    # the filtered flat search: K 7 and 150, with ranges and groups, every dot precision, float16
    from raid_fast.kernels.cosine_filter import FilterPlan, cosine_topk_filtered

    t = unit(400, 32)
    lo, hi = torch.zeros(9, dtype=torch.int64), torch.full((9,), 300, dtype=torch.int64)
    cosine_topk_filtered(q, t, 7, lo, hi, torch.arange(400) % 5, torch.arange(9) % 5, plan=FilterPlan(4, 40))
    for precision in cosine_topk.DOT_PRECISIONS:
        cosine_topk.DOT_PRECISION = precision
        try:
            cosine_topk_filtered(q, t, 150, plan=FilterPlan(2, 400))
        finally:
            cosine_topk.DOT_PRECISION = None
    # float16 compare pass and the exact re-rank (K2 = 512 for K = 150, 32 for K = 7)
    cosine_topk_filtered(q, t, 150, plan=FilterPlan(2, 400), half=True)
    cosine_topk_filtered(q, t, 7, lo, hi, torch.arange(400) % 5, torch.arange(9) % 5, plan=FilterPlan(4, 40), half=True)
    # the prototype probe: S = 50 (one 64-slot block) and S = 100, aligned and unaligned D
    from raid_fast import _dispatch

    for d, s, p in ((32, 50, 5), (24, 100, 3)):
        sem = torch.nn.functional.normalize(torch.randn(2, s, d), dim=-1)
        args = (torch.randn(2, 9, d), sem, torch.zeros(2, s), torch.tensor([1, 0]), p)
        _dispatch.call("probe_prototypes", *args, backend="triton")
        # routed by CLS tokens (15 classes, as MVTec)
        sem15 = torch.nn.functional.normalize(torch.randn(15, s, d), dim=-1)
        protos15 = torch.nn.functional.normalize(torch.randn(15, d), dim=-1)
        args = (torch.randn(2, 9, d), sem15, torch.zeros(15, s), None, p, 0, torch.randn(2, d), protos15)
        _dispatch.call("probe_prototypes", *args, backend="triton")
    # half-precision Lloyd: k <= 64 (128-point tiles) and k > 64 (64-point tiles, several dim windows),
    # D a multiple of 16 (vectorised loads) or not, both dtypes, spherical or not
    import raid_fast

    x = torch.randn(2, 150, 48)
    for precision, spherical in (("fp16", False), ("bf16", True)):
        raid_fast.kmeans(x, 5, niter=1, precision=precision, spherical=spherical, backend="triton")
    raid_fast.kmeans(torch.randn(130, 300), 100, niter=1, precision="fp16", backend="triton")
    raid_fast.kmeans(torch.randn(40, 17), 3, niter=1, precision="fp16", backend="triton")
    exercise_benchmark_shapes()


def exercise_benchmark_shapes() -> None:
    """The kernels of the benchmarks' targets (``mvtec448``: D = 384, K = 150, P = 5, S = 50, 15
    classes routed by CLS; Table 4's 1-NN row; KMeans k = 50) on few queries and tokens, counts kept
    divisible by 16 as there (the JIT specialises on it)."""
    import raid_fast
    from raid_fast import _dispatch, ops

    d = 384
    q, t = unit(32, d), unit(1024, d)
    for k in (150, 1):
        ops.cosine_topk(q, t, k, backend="triton")
    sem = torch.nn.functional.normalize(torch.randn(15, 50, d), dim=-1)
    protos = torch.nn.functional.normalize(torch.randn(15, d), dim=-1)
    args = (torch.randn(1, 32, d), sem, torch.zeros(15, 50), None, 5, 0, torch.randn(1, d), protos)
    _, qn, probes, _ = _dispatch.call("probe_prototypes", *args, backend="triton")  # probes [1, 32, 5]
    offsets = torch.arange(751) * 16  # [751]: 750 lists of 16 tokens
    tokens = unit(750 * 16, d)
    ops.ivf_topk_cost_volume(qn, probes.view(32, 5), offsets, tokens, 150, None, None, 1, 4, 8, 1.0, backend="triton")
    raid_fast.kmeans(torch.randn(2, 256, d), 50, niter=1, precision="fp16", spherical=True, backend="triton")


@INTERPRETED_ONLY
def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    with triton_aot.Recorder() as recorder:
        exercise_public_ops()
    launches = recorder.launches
    kernels = {launch["kernel"].split(":")[1] for launch in launches}
    assert kernels >= {
        "_cosine_topk_partial_kernel",
        "_topk_merge_kernel",
        "_filter_candidates_kernel",
        "_candidate_topk_kernel",
        "_rerank_kernel",
        "_ivf_topk_scan_kernel",
        "_cost_volume_kernel",
        "_lloyd_pass_kernel",
        "_lloyd_reduce_kernel",
        "_lloyd_fixup_kernel",
        "_probe_kernel",
        "_probe_count_kernel",
        "_probe_schedule_kernel",
        "_probe_scatter_kernel",
    }
    todo = triton_aot.gpu_launches(launches)
    assert all(launch["args"]["DOT_F32"] == ["value", False] for launch in todo if "DOT_F32" in launch["args"])
    assert {json.dumps(launch["args"]["NATIVE_SORT"]) for launch in todo if "NATIVE_SORT" in launch["args"]} == {
        json.dumps(["value", True]),
        json.dumps(["value", False]),
    }
    report = _compile_in_subprocess(todo, jobs=2, timeout=1500)
    failures = "\n\n".join(f"{f[0]['kernel']} {f[0]['args']}:\n{f[1]}" for f in report["failures"])
    assert not report["failures"], (
        f"{len(report['failures'])} of {len(todo)} specialisations fail to compile:\n{failures}"
    )
    assert report["compiled"] == len(todo)
    # an H100 / H200 block gets at most 227 KiB of shared memory; more fails only at launch there
    too_big = [(k[0]["kernel"], k[0]["args"], k[1]) for k in report["kernels"] if k[1] > H100_MAX_SHARED]
    assert not too_big, f"kernels over {H100_MAX_SHARED} bytes of shared memory: {too_big}"
    # register spills cost speed, not correctness. Real backbones have D % 16 == 0, the specialisations
    # that matter: spills there are reported, and must stay at zero for the Lloyd pass, whose speed
    # is the KMeans target (an unaligned D, such as the tests' 300, may spill a little)
    aligned = [k for k in report["kernels"] if "D" in k[0]["args"] and k[0]["args"]["D"][1] % 16 == 0]
    spilled = [(k[0]["kernel"], k[0]["args"]["D"][1], k[2]) for k in aligned if k[2]]
    if spilled:
        warnings.warn(f"register spills (bytes) on sm_90 at aligned D: {spilled}", stacklevel=1)
    lloyd = [k for k in aligned if k[0]["kernel"].endswith("_lloyd_pass_kernel")]
    # the benchmark's pass (k = 50, D = 384: 64 centroid slots, 128-dim chunks, three accumulators)
    assert any(k[0]["args"]["KP"][1] == 64 and k[0]["args"]["N_ACC"][1] == 3 for k in lloyd), "no D = 384 pass"
    # None would mean ptxas did not run (triton ships it), and the check would pass blindly
    assert lloyd and all(k[2] == 0 for k in lloyd), [(k[0]["args"], k[2]) for k in lloyd]


def test_gpu_launches_are_the_jit_specialisations():
    # ints are told apart by width, divisibility by 16 and being 1 (a constant), as the JIT does;
    # the interpreter's constexprs become the compiled runs' ones
    def launch(m, dot_f32=True, native=False):
        args = {"x_ptr": ["ptr", "float16", True], "M": ["int", m], "DOT_F32": ["value", dot_f32]}
        return {"kernel": "k:f", "args": {**args, "NATIVE_SORT": ["value", native]}, "options": {"num_warps": 4}}

    out = triton_aot.gpu_launches([launch(9), launch(33), launch(1), launch(32), launch(48)])
    assert sorted((o["args"]["M"][1], o["args"]["NATIVE_SORT"][1]) for o in out) == [
        (1, False),
        (1, True),
        (9, False),
        (9, True),
        (32, False),
        (32, True),
    ]
    assert all(o["args"]["DOT_F32"] == ["value", False] for o in out)
    native_only = triton_aot.gpu_launches([launch(9), launch(9, dot_f32=False)], native_sort=(True,))
    assert [o["args"]["NATIVE_SORT"] for o in native_only] == [["value", True]]


@INTERPRETED_ONLY
def test_precompile_records_the_target_steps():
    # the launches of the benchmark steps, recorded without running a kernel, as a GPU run makes them
    from benchmarks import precompile

    want = {
        "kmeans_all": {"_lloyd_pass_kernel", "_lloyd_reduce_kernel", "_lloyd_fixup_kernel"},
        "retrieval_b1": {"_probe_kernel", "_ivf_topk_scan_kernel", "_filter_candidates_kernel", "_rerank_kernel"},
        "retrieval_b32": {"_probe_scatter_kernel", "_topk_merge_kernel", "_cost_volume_kernel"},
        "table4": {"_cosine_topk_partial_kernel", "_ivf_topk_scan_kernel"},
    }
    for step, kernels in want.items():
        launches = precompile.record(step, "small", "cpu")
        assert {launch["kernel"].split(":")[1] for launch in launches} >= kernels, step
        assert all(launch["steps"] == [step] for launch in launches)
        for launch in launches:
            assert launch["args"].get("DOT_F32", ["value", False]) == ["value", False]
            assert launch["args"].get("NATIVE_SORT", ["value", True]) == ["value", True]
    # Table 4's 1-NN row: K = 1, a constant of the specialisation
    launches = precompile.record("table4", "small", "cpu")
    assert any(launch["args"].get("K") == ["int", 1] for launch in launches)


def _compile_in_subprocess(
    launches: list, cache: Path | None = None, jobs: int | None = None, timeout: int = 600
) -> dict:
    """The AOT compiler's report on ``launches``, compiled for sm_90 in a fresh process (into
    ``cache`` as TRITON_CACHE_DIR when given)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache is not None:
        env["TRITON_CACHE_DIR"] = str(cache)
    jobs_args = [] if jobs is None else ["--jobs", str(jobs)]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.library.triton_aot", "--arch", "90", *jobs_args],
        input=json.dumps(launches),
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@INTERPRETED_ONLY
def test_compiled_kernels_are_read_back_from_the_cache(tmp_path):
    # what one process compiles through the JIT's warmup, the next loads from the triton cache
    # (the precompile step relies on it): nothing is compiled or written the second time
    with triton_aot.Recorder() as recorder:
        from raid_fast import ops

        ops.cost_volume(torch.rand(2, 6, 5), 2, 3, backend="triton")
    (launch,) = recorder.launches
    first = _compile_in_subprocess([launch], tmp_path)
    assert first["compiled"] == 1 and not first["failures"]
    assert len(list(tmp_path.rglob("*.cubin"))) == 1
    # a recompile would write its files again (the cache replaces a file to store it)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = _compile_in_subprocess([launch], tmp_path)
    assert again["compiled"] == 1 and not again["failures"]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == files


@INTERPRETED_ONLY
def test_record_launches_plugin(tmp_path):
    # pytest -p tests.library.triton_aot --record-launches FILE: the GPU specialisations of a test run
    out = tmp_path / "launches.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.library.triton_aot",
            "--record-launches",
            str(out),
            "tests/library/test_search_triton.py::test_cost_volume_matches_ref",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    launches = json.loads(out.read_text())
    assert {launch["kernel"].split(":")[1] for launch in launches} == {"_cost_volume_kernel"}
    tests = {t for launch in launches for t in launch["tests"]}
    assert tests == {
        f"tests/library/test_search_triton.py::test_cost_volume_matches_ref[network-{case}]"
        for case in ("2-3-5-7", "1-9-8-150", "3-1-1-1")
    }
