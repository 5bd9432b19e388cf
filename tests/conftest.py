import inspect
import os

import pytest
import torch

# without a GPU the triton kernels run under the interpreter; the switch must be set before triton
# is first imported (auto dispatch never picks interpreted kernels, tests ask for them explicitly)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tf32 would make the references themselves inexact on GPUs
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

HAS_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture(autouse=True)
def _nan_poison_empty(monkeypatch):
    """torch.empty called from raid_fast code returns NaN / sentinel-filled memory, so an output
    slot that no code path writes shows up as a wrong value instead of passing by luck."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        caller = inspect.currentframe().f_back
        module = caller.f_globals.get("__name__", "") if caller is not None else ""
        if module.startswith("raid_fast"):
            if out.is_floating_point():
                out.fill_(float("nan"))
            elif out.dtype != torch.bool:
                out.fill_(-123456789 if out.dtype in (torch.int64, torch.int32) else 0)
        return out

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords and not HAS_GPU:
            item.add_marker(skip_cuda)


def pytest_sessionstart(session):
    from raid_fast import _ext

    if os.environ.get("RAID_FAST_REQUIRE_EXT", "0") not in ("", "0") and not _ext.HAS_EXT:
        raise pytest.UsageError(f"RAID_FAST_REQUIRE_EXT is set but the extension is missing: {_ext.EXT_IMPORT_ERROR}")
