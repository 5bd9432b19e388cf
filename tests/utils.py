"""Shared test helpers: backend parametrisation and tie-aware comparisons."""

from __future__ import annotations

import pytest
import torch

import raid_fast


def backend_params(op: str) -> list:
    """pytest params for every backend of ``op``; unavailable ones skip with their reason, the
    CUDA one is marked ``cuda`` (skipped without a GPU)."""
    params = []
    for name, status in raid_fast.backends()[op].items():
        marks = []
        if name == "cuda":
            marks.append(pytest.mark.cuda)
        if not status.startswith("ok"):
            marks.append(pytest.mark.skip(reason=f"{name}: {status}"))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def assert_close_verbose(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> None:
    """allclose with a message that shows the worst element and NaN/inf mismatches."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN at {torch.nonzero(nan_a ^ nan_e)[:5].tolist()}"
    ok = torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok)
        first = tuple(bad[0].tolist())
        err = (actual - expected).abs().nan_to_num(0).max().item()
        msg = (
            f"{name}: {bad.shape[0]} of {actual.numel()} elements differ (max abs err {err:.3e}); "
            f"first at {first}: {actual[first].item()} vs {expected[first].item()}"
        )
        raise AssertionError(msg)


def assert_assign_equal_up_to_ties(
    x: torch.Tensor,
    centroids: torch.Tensor,
    offsets: torch.Tensor,
    idx: torch.Tensor,
    ref_idx: torch.Tensor,
    rtol: float = 1e-4,
) -> None:
    """Assignments must be equal except where the two centroids are equally near (within rtol)."""
    idx, ref_idx = idx.cpu(), ref_idx.cpu()
    assert idx.shape == ref_idx.shape
    diff = torch.nonzero(idx != ref_idx).flatten()
    if diff.numel() == 0:
        return
    x, centroids, off = x.cpu().double(), centroids.cpu().double(), offsets.cpu()
    group = torch.searchsorted(off, diff, right=True) - 1
    for i, g in zip(diff.tolist(), group.tolist()):
        a = (x[i] - centroids[g, idx[i]]).square().sum()
        b = (x[i] - centroids[g, ref_idx[i]]).square().sum()
        scale = max(float(b), 1e-12)
        assert abs(float(a - b)) <= rtol * scale + 1e-6, (
            f"point {i}: idx {int(idx[i])} (d2={float(a):.6g}) vs ref {int(ref_idx[i])} (d2={float(b):.6g}) is not a tie"
        )


def blobs(n_groups: int, n: int, d: int, centers: int, seed: int = 0, spread: float = 0.05) -> torch.Tensor:
    """[G, n, D] float32 points around well-separated random centers (few near-ties)."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(n_groups, centers, d, generator=gen)  # [G, C, D]
    which = torch.randint(0, centers, (n_groups, n), generator=gen)  # [G, n]
    pts = torch.gather(c, 1, which.unsqueeze(-1).expand(-1, -1, d))
    return (pts + spread * torch.randn(n_groups, n, d, generator=gen)).float()
