"""Wherever triton imports, every kernel module imports and every Triton op is registered.

The triton cases of the other files skip when their backend is unavailable, and a kernel module that
fails to import makes it unavailable (the import error becomes the reason): a broken kernel would
pass a test run as a row of skips. Here it fails, with the module's own traceback. On a GPU (compiled
kernels) and under ``TRITON_INTERPRET=1`` each op's triton backend must also report "ok". Without
triton these skip, unless ``RAID_FAST_REQUIRE_TRITON=1`` (set by ``benchmarks/device_check.sh`` on a
GPU machine), where a missing triton fails too.
"""

import importlib
import os

import pytest
import torch

import raid_fast
from raid_fast import kernels

pytestmark = pytest.mark.triton

KERNEL_MODULES = ("cosine_topk", "cosine_filter", "cost_volume", "ivf_topk", "kmeans", "probe")
TRITON_OPS = (
    "cosine_topk",
    "ivf_topk",
    "ivf_topk_cost_volume",
    "cost_volume",
    "kmeans_assign",
    "kmeans_step",
    "probe_prototypes",
)


@pytest.fixture(autouse=True)
def _needs_triton():
    if kernels.HAS_TRITON:
        return
    if os.environ.get("RAID_FAST_REQUIRE_TRITON", "0") not in ("", "0"):
        pytest.fail(f"RAID_FAST_REQUIRE_TRITON is set but triton does not import: {kernels.TRITON_IMPORT_ERROR}")
    pytest.skip(f"triton is not importable: {kernels.TRITON_IMPORT_ERROR}")


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernel_module_imports(module):
    importlib.import_module(f"raid_fast.kernels.{module}")


def test_no_kernel_import_error():
    assert kernels.KERNEL_IMPORT_ERROR is None, kernels.KERNEL_IMPORT_ERROR


@pytest.mark.parametrize("op", TRITON_OPS)
def test_op_registered(op):
    table = raid_fast.backends()
    assert "triton" in table[op], f"{op} has no triton backend: {table[op]}"
    if torch.cuda.is_available() or kernels.TRITON_INTERPRET:
        assert table[op]["triton"].startswith("ok"), f"{op}: triton {table[op]['triton']}"
