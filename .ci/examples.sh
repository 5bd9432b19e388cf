#!/usr/bin/env bash
# The drop-in examples (examples/README.md) on top of the environment .ci/run sets up: anomalib's
# PatchCore with raid_fast's search must reproduce anomalib's own anomaly maps, scores and metrics,
# and the AnomalyDINO-style example must run. anomalib is not a raid_fast dependency, so it goes
# into a throwaway venv that sees this environment's packages (raid_fast, torch, timm, ...);
# examples/anomalib-constraints.txt keeps that torch stack as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# the examples load the packaged Lite0 weights; a stray model-hub download must fail at once
export HF_HUB_OFFLINE=1

venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
t0=$SECONDS
python -m venv --system-site-packages --without-pip "$venv"
# a venv made from a venv sees only the base installation: add this environment's own site-packages
# (addsitedir, so its .pth files, e.g. raid_fast's editable install, work there too)
python - "$venv" <<'PY'
import site, subprocess, sys
if sys.prefix != sys.base_prefix:
    venv_python = f"{sys.argv[1]}/bin/python"
    purelib = subprocess.check_output([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    with open(f"{purelib}/_outer_environment.pth", "w") as f:
        f.write("".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()))
PY
# pip is the outer one; the only sdist (FrEIA) builds with the outer setuptools
"$venv/bin/python" -m pip install -q --no-build-isolation "anomalib==2.7.0" -c examples/anomalib-constraints.txt
# anomalib must have left torch and raid_fast as they are
where='import raid_fast, torch; print(torch.__version__, torch.__file__, raid_fast.__file__)'
if [ "$(python -c "$where")" != "$("$venv/bin/python" -c "$where")" ]; then
    echo "the anomalib venv does not use this environment's torch / raid_fast:" >&2
    python -c "$where" >&2
    "$venv/bin/python" -c "$where" >&2
    exit 1
fi
echo "examples: anomalib venv ready in $((SECONDS - t0)) s"

# glibc must read this at start-up: it keeps anomalib's KCenterGreedy from growing memory on CPU
export MALLOC_MMAP_THRESHOLD_=1048576
# one thread: the examples are small, and on a busy 2-core machine two OpenMP threads spin-waited
# to 3x the wall time and 4x the CPU time of one thread (patchcore_anomalib.py, examples/README.md)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
t0=$SECONDS
"$venv/bin/python" examples/patchcore_anomalib.py
echo "examples: patchcore_anomalib.py took $((SECONDS - t0)) s"
t0=$SECONDS
"$venv/bin/python" examples/anomalydino.py
echo "examples: anomalydino.py took $((SECONDS - t0)) s"
