#!/usr/bin/env bash
# One short run on a GPU machine: build the CUDA extension, run the `cuda`/`triton` tests, then the
# GPU benchmarks (KMeans, retrieval, Table 4, the regression suite at full size, the scaling
# sweeps), writing everything (logs, CSV, PNG, environment) into the folder given as $1, to be
# committed under benchmarks/results/. Steps run in order of importance, each with its own time
# cap, and a step that cannot finish before DEADLINE_S (default 570 s after the start) is skipped
# and logged, so that a 10-minute device call always returns what was measured.
#
# DRY_RUN=1 runs the same steps on the CPU at small sizes without building (the installed package is
# used): a rehearsal of the script's plumbing before a GPU session spends device time on it.
# ARCHIVE=FILE.tgz packs OUT_DIR into one archive after every step (a runner that returns only a few
# files, or kills the script at its limit, still gets everything measured so far):
#   ARCHIVE=$OUT/device_check.tgz benchmarks/device_check.sh /tmp/device_check
set -uo pipefail
out=${1:?usage: benchmarks/device_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
deadline=$((SECONDS + ${DEADLINE_S:-570}))
status=0
if [ "${DRY_RUN:-0}" = 1 ]; then
  dev=cpu km_all=small15 km_one=small ret_size=small t4_scale=small suite_size=small scaling_args=--quick
  prof_scale=small test_workers=2
else
  dev=cuda km_all=full15 km_one=full ret_size=mvtec448 t4_scale=mvtec448 suite_size=full scaling_args=
  prof_scale=full test_workers=8
fi

# run_step NAME CAP_S LOG COMMAND...: runs COMMAND under min(CAP_S, time left), tees to LOG
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((deadline - SECONDS - 5))
  if [ "$left" -lt 20 ]; then
    echo "device_check: skipped $name (${left}s left)" | tee -a "$out/skipped.txt"
    return
  fi
  [ "$cap" -lt "$left" ] || cap=$left
  echo "device_check: $name (cap ${cap}s)"
  timeout "$cap" "$@" 2>&1 | tee -a "$out/$log"
  local rc=${PIPESTATUS[0]}
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
  if ! RAID_FAST_FORCE_CUDA=1 python -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
    tail -50 "$out/build.log"
    echo "device_check: the CUDA build failed (see build.log)"
    pack
    exit 1
  fi
  grep "raid_fast build:" "$out/build.log" || true
fi
python -m raid_fast.cli env --json >"$out/env.json" 2>&1 || status=1
if [ "$dev" = cuda ]; then
  python - <<'PY' || { pack; exit 1; }
import raid_fast._C as c
assert c.cuda_compiled(), "extension built without CUDA"
print("extension:", dict(c.build_info()))
PY
fi

# correctness first: the cuda-marked tests, then the triton kernels compiled against the references
# pytest-xdist (when installed) compiles the many triton specialisations in parallel
xdist=()
if python -c "import xdist" 2>/dev/null; then
  xdist=(-n "${TEST_WORKERS:-$test_workers}")
fi
run_step "cuda and triton tests" 200 pytest_cuda.log python -m pytest -m "cuda or triton" -q -p no:cacheprovider "${xdist[@]}" tests

run_step "kmeans all classes" 80 bench_kmeans.log python -m benchmarks.bench_kmeans --size "$km_all" --device "$dev" --out "$out"
# every provider at batch 1 (the flat targets are per image); at batch 32 the hierarchical target,
# with flat only as the reference point, so the flat variants do not eat the step's cap
run_step "retrieval batch 1" 45 bench_retrieval.log \
  python -m benchmarks.bench_retrieval --size "$ret_size" --batch 1 --device "$dev" --out "$out"
b32_providers=hierarchical,flat_single,flat_multi,matmul_topk
if [ "$dev" = cuda ]; then b32_providers="$b32_providers,hierarchical_tf32x3"; fi
run_step "retrieval batch 32" 45 bench_retrieval.log \
  python -m benchmarks.bench_retrieval --size "$ret_size" --batch 32 --device "$dev" --out "$out" \
  --providers "$b32_providers"
run_step "profile" 60 profile.log python -m benchmarks.kernel_profile --device "$dev" --scale "$prof_scale" --out "$out"
run_step "table 4" 100 table4.log python -m benchmarks.table4 --device "$dev" --scale "$t4_scale" --rounds 5 --out "$out"
run_step "regression suite ($suite_size)" 100 suite.log \
  python -m pytest benchmarks --benchmark-only --bench-size "$suite_size" -q -p no:cacheprovider \
  --benchmark-json "$out/suite_$suite_size.json"
# shellcheck disable=SC2086  # scaling_args is empty or one flag
run_step "scaling sweeps" 100 scaling.log python -m benchmarks.scaling --device "$dev" $scaling_args --out "$out"
run_step "kmeans one class" 40 bench_kmeans.log python -m benchmarks.bench_kmeans --size "$km_one" --device "$dev" --out "$out"

echo "device_check: exit status $status after ${SECONDS}s"
pack
exit $status
