#!/usr/bin/env bash
# Builds the wheel (as a project depending on raid_fast installs it: not editable) and checks it in
# a fresh virtual environment, away from the checkout: the package, its kernels and its compiled
# extension import from the wheel, the core dependencies are torch, numpy and safetensors only, and
# knn / retrieve / Index give exact results. The venv sees the machine's torch (system site
# packages) so that the extension built against it loads.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# C++ only: the CUDA build is the editable install's job in .ci/run; this checks packaging
RAID_FAST_NO_CUDA=1 python -m pip wheel . --no-build-isolation --no-deps -q -w "$work/dist"
python -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install -q --no-deps "$work"/dist/raid_fast-*.whl
cd "$work"
"$work/venv/bin/raid-fast" env > /dev/null
"$work/venv/bin/python" - "$work/venv" <<'PY'
import importlib.metadata
import re
import sys

import torch

import raid_fast
import raid_fast.kernels
from raid_fast import _ext

venv = sys.argv[1]
for module in (raid_fast, raid_fast.kernels):
    assert module.__file__.startswith(venv), f"{module.__name__} imported from {module.__file__}, not the wheel"
assert _ext.HAS_EXT, f"the wheel's extension does not load: {_ext.EXT_IMPORT_ERROR}"
core = sorted(
    re.split(r"[<>=!~ ;\[]", req)[0].lower()
    for req in importlib.metadata.requires("raid_fast")
    if "extra ==" not in req
)
assert core == ["numpy", "safetensors", "torch"], f"core dependencies must be torch, numpy, safetensors: {core}"
table = raid_fast.backends()
assert table["cosine_topk"]["cpp"] == "ok", table["cosine_topk"]

g = torch.Generator().manual_seed(0)
bank, queries = torch.randn(500, 24, generator=g), torch.randn(40, 24, generator=g)
dist, idx = raid_fast.knn(queries, bank, 3)
exact = torch.cdist(queries.double(), bank.double()).pow(2).topk(3, largest=False)
assert torch.equal(idx, exact.indices), "knn differs from brute force"
index = raid_fast.Index(bank, n_lists=8, nprobe=8)
assert torch.equal(index.search(queries, 3)[1], idx), "a full-probe IVF index differs from flat search"
db = raid_fast.TokenDatabase.build(bank.view(20, 25, 24), n_semantic=4, kmeans_iters=3)
res = raid_fast.retrieve(queries.view(2, 20, 24), db, k=5, nprobe=4)
flat = raid_fast.retrieve(queries.view(2, 20, 24), db, k=5, mode="flat")
assert torch.equal(res.idx, flat.idx), "hierarchical retrieval with every list probed differs from flat"
import raid_fast.detect.detector  # noqa: F401  (the detect extra is installed here)

print(f"wheel ok: {raid_fast.__file__}, extension {_ext.build_info()}")
PY
