#!/usr/bin/env bash
# One short run on a GPU machine: build the CUDA extension, run the `cuda` tests, run the GPU
# benchmarks, and write everything (logs, CSV, environment) into the folder given as $1, to be
# committed under benchmarks/results/. Designed to finish within 10 minutes on one H200.
set -uo pipefail
out=${1:?usage: benchmarks/device_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
status=0

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -1 || true
} 2>&1 | tee "$out/device.txt"

# the working tree arrives without build outputs: build here, with CUDA required
if ! RAID_FAST_FORCE_CUDA=1 python -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -50 "$out/build.log"
  echo "device_check: the CUDA build failed (see build.log)"
  exit 1
fi
grep "raid_fast build:" "$out/build.log" || true
python -m raid_fast.cli env --json >"$out/env.json" 2>&1 || status=1
python - <<'PY' || exit 1
import raid_fast._C as c
assert c.cuda_compiled(), "extension built without CUDA"
print("extension:", dict(c.build_info()))
PY

# the cuda-marked tests, then the triton kernels compiled (not interpreted) against the references
timeout 240 python -m pytest -m "cuda or triton" -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

for size in full15 full; do
  timeout 120 python -m benchmarks.bench_kmeans --size "$size" --device cuda --out "$out" 2>&1 | tee -a "$out/bench_kmeans.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
for batch in 1 32; do
  timeout 120 python -m benchmarks.bench_retrieval --size mvtec448 --batch "$batch" --device cuda --out "$out" 2>&1 | tee -a "$out/bench_retrieval.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

echo "device_check: exit status $status"
exit $status
