#!/usr/bin/env bash
# One short run on a GPU machine: build the CUDA extension, check every GPU path against the torch
# references, measure the targets, then the sweeps, writing everything (logs, CSV, PNG, environment,
# compile counts) into the folder given as $1, to be committed under benchmarks/results/.
#
# Steps, most valuable first, each under its own time cap:
#   correctness  the Triton ops' registration (a kernel module that fails to import fails here, not
#                as a row of skips); the cuda/triton tests in the sort network compiled runs use
#   compile      the Triton kernels of the target benchmarks, compiled in parallel into the cache
#                the benchmarks read (benchmarks/precompile.py)
#   targets      KMeans over the 15 classes, retrieval at batch 32 and at batch 1 (hierarchical and
#                flat), Table 4
#   sweeps       the regression suite, the scaling sweeps, the kernel profile, KMeans over one
#                class, and the tests of the min/max sort network (compiled runs never take it)
# A step that cannot finish before DEADLINE_S (default 570 s after the start on a GPU) is skipped
# and logged. The correctness tests get at most the time left minus RESERVE_S (default 375 s: the caps
# of the compile and target steps), so that however long the build or the tests' compiling takes,
# the targets keep their time; their log shows how far they got.
#
# Compiling: Triton compiles each specialisation (constexprs, dtypes, alignment and divisibility by
# 16 of the arguments, launch options) once per machine, into TRITON_CACHE_DIR, which every step
# shares: a later process loads what an earlier one compiled. compiles.txt records how many kernels
# each step compiled. Expected compile work per step (CPU seconds of compiling for sm_90 with
# triton 3.8, measured on the 2-core dev machine with tests/library/triton_aot.py, docs/kernels.md;
# the H200 machine's triton 3.6 and CPU will differ):
#   cuda and triton tests   119 specialisations, 236 CPU s (8 xdist workers: about 30 s each)
#   precompile              48 specialisations, 113 CPU s on 16 processes (its longest: 14 s)
#   targets                 none left once precompile ran; else each compiles its own, one at a
#                           time: kmeans 9 s, retrieval batch 32 37 s, batch 1 57 s more, table 4 6 s
#   min/max network tests   9 specialisations, 27 CPU s
#   sweeps                  not recorded (they vary the shapes: compiles.txt tells)
#
# DRY_RUN=1 runs the same steps on the CPU at small sizes without building (the installed package is
# used): a rehearsal of the script's plumbing before a GPU session spends device time on it. There
# the triton tests run interpreted and the compile step only records its launches.
# ARCHIVE=FILE.tgz packs OUT_DIR into one archive after every step (a runner that returns only a few
# files, or kills the script at its limit, still gets everything measured so far):
#   ARCHIVE=$OUT/device_check.tgz benchmarks/device_check.sh /tmp/device_check
set -uo pipefail
out=${1:?usage: benchmarks/device_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# one compile cache for every step and process of this run
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
mkdir -p "$TRITON_CACHE_DIR"
reserve=${RESERVE_S:-375}
status=0
if [ "${DRY_RUN:-0}" = 1 ]; then
  dev=cpu km_all=small15 km_one=small ret_size=small t4_scale=small suite_size=small scaling_args=--quick
  prof_scale=small test_workers=2 pc_size=small
  # on 2 shared cores Table 4 (a DINOv2 forward per predict) and the suite take minutes even at
  # their small sizes, and interpreted, the network tests are most of the triton tests: the
  # rehearsal gives them the time they need, and itself more than a device call's 10 minutes
  t4_cap=360 suite_cap=240 network_cap=240 default_deadline=1500
  # the accuracy part at 128 px: the stride-8 tokens of 90 embedded test images at 256 px take
  # most of the cap on 2 cores, and the rehearsal checks the plumbing, not the numbers
  t4_args="--image-size 128"
else
  dev=cuda km_all=full15 km_one=full ret_size=mvtec448 t4_scale=mvtec448 suite_size=full scaling_args=
  prof_scale=full test_workers=8 pc_size=full
  t4_cap=100 suite_cap=100 network_cap=60 default_deadline=570
  t4_args=
fi
deadline=$((SECONDS + ${DEADLINE_S:-$default_deadline}))

compiled_kernels() {
  find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l
}

# run_step NAME CAP_S RESERVE_S LOG COMMAND...: runs COMMAND under min(CAP_S, time left - RESERVE_S),
# tees to LOG, logs the kernels it compiled
run_step() {
  local name=$1 cap=$2 keep=$3 log=$4
  shift 4
  local left=$((deadline - SECONDS - 5 - keep))
  if [ "$left" -lt 20 ]; then
    echo "device_check: skipped $name (${left}s left)" | tee -a "$out/skipped.txt"
    return
  fi
  [ "$cap" -lt "$left" ] || cap=$left
  echo "device_check: $name (cap ${cap}s)"
  local before start=$SECONDS
  before=$(compiled_kernels)
  timeout "$cap" "$@" 2>&1 | tee -a "$out/$log"
  local rc=${PIPESTATUS[0]}
  echo "$name: $(($(compiled_kernels) - before)) kernels compiled, $((SECONDS - start))s" >>"$out/compiles.txt"
  if [ "$rc" -ne 0 ]; then
    echo "device_check: $name failed with status $rc" | tee -a "$out/failed.txt"
    status=1
  fi
  pack
}

pack() {
  if [ -n "${ARCHIVE:-}" ]; then
    tar -czf "$ARCHIVE.part" -C "$out" . && mv "$ARCHIVE.part" "$ARCHIVE"
  fi
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -1 || true
} 2>&1 | tee "$out/device.txt"

# the working tree arrives without build outputs: build here, with CUDA required
if [ "$dev" = cuda ]; then
  build_start=$SECONDS
  if ! RAID_FAST_FORCE_CUDA=1 python -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
    tail -50 "$out/build.log"
    echo "device_check: the CUDA build failed (see build.log)"
    pack
    exit 1
  fi
  grep "raid_fast build:" "$out/build.log" || true
  echo "build: $((SECONDS - build_start))s" | tee -a "$out/compiles.txt"
fi
if ! python -m raid_fast.app.cli env --json >"$out/env.json" 2>&1; then
  echo "device_check: raid-fast env failed (see env.json)" | tee -a "$out/failed.txt"
  status=1
fi
if [ "$dev" = cuda ]; then
  python - <<'PY' || { pack; exit 1; }
import raid_fast._C as c
assert c.cuda_compiled(), "extension built without CUDA"
print("extension:", dict(c.build_info()))
PY
fi

# correctness first. pytest-xdist (when installed) compiles the triton specialisations in parallel;
# the sm_90 compile checks are CI's (they record interpreted launches; on a GPU the kernels compile
# for real in the other tests)
xdist=()
if python -c "import xdist" 2>/dev/null; then
  xdist=(-n "${TEST_WORKERS:-$test_workers}")
fi
tests=(python -m pytest -q -p no:cacheprovider --ignore=tests/library/test_triton_compile.py)
run_step "triton registration" 30 0 pytest_cuda.log env RAID_FAST_REQUIRE_TRITON=1 "${tests[@]}" \
  tests/library/test_triton_registration.py
run_step "cuda and triton tests" 180 "$reserve" pytest_cuda.log \
  "${tests[@]}" "${xdist[@]}" -m "cuda or triton" -k "not network" tests

if [ "$dev" = cuda ]; then
  run_step "precompile" 90 0 precompile.log python -m benchmarks.precompile --list "$out/precompile.json"
else
  run_step "precompile" 90 0 precompile.log \
    env TRITON_INTERPRET=1 python -m benchmarks.precompile --device cpu --size "$pc_size" --list "$out/precompile.json"
fi

run_step "kmeans all classes" 80 0 bench_kmeans.log \
  python -m benchmarks.bench_kmeans --size "$km_all" --device "$dev" --out "$out"
# at batch 32 the hierarchical target, with flat only as the reference point, so that the flat
# variants do not eat the step's cap; every provider at batch 1 (the flat targets are per image)
b32_providers=hierarchical,flat_single,flat_multi,matmul_topk
if [ "$dev" = cuda ]; then b32_providers="$b32_providers,hierarchical_tf32x3"; fi
run_step "retrieval batch 32" 45 0 bench_retrieval.log \
  python -m benchmarks.bench_retrieval --size "$ret_size" --batch 32 --device "$dev" --out "$out" \
  --providers "$b32_providers"
run_step "retrieval batch 1" 60 0 bench_retrieval.log \
  python -m benchmarks.bench_retrieval --size "$ret_size" --batch 1 --device "$dev" --out "$out"
run_step "table 4" "$t4_cap" 0 table4.log \
  python -m benchmarks.table4 --device "$dev" --scale "$t4_scale" --rounds 5 --out "$out" $t4_args

# the detector end to end: eager first, then bf16, torch.compile (with CUDA graphs) and the exported
# package; each provider's rows are written as soon as it is measured
if [ "$dev" = cuda ]; then
  run_step "detector latency" 120 0 latency.log python -m benchmarks.latency --scale mvtec256 --device cuda --out "$out"
else
  run_step "detector latency" 120 0 latency.log \
    python -m benchmarks.latency --scale small --device cpu --batch 4 --rounds 5 --providers eager --out "$out"
fi

run_step "regression suite ($suite_size)" "$suite_cap" 0 suite.log \
  python -m pytest benchmarks --benchmark-only --bench-size "$suite_size" -q -p no:cacheprovider \
  --benchmark-json "$out/suite_$suite_size.json"
# shellcheck disable=SC2086  # scaling_args is empty or one flag
run_step "scaling sweeps" 100 0 scaling.log python -m benchmarks.scaling --device "$dev" $scaling_args --out "$out"
run_step "profile" 60 0 profile.log \
  python -m benchmarks.kernel_profile --device "$dev" --scale "$prof_scale" --out "$out"
run_step "kmeans one class" 40 0 bench_kmeans.log \
  python -m benchmarks.bench_kmeans --size "$km_one" --device "$dev" --out "$out"
run_step "triton tests, min/max sort network" "$network_cap" 0 pytest_cuda.log \
  "${tests[@]}" "${xdist[@]}" -m triton -k network tests

echo "device_check: exit status $status after ${SECONDS}s"
pack
exit $status
