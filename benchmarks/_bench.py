"""Timing, environment and CSV helpers shared by every benchmark.

CUDA: warm-up, then ``triton.testing.do_bench`` (quantiles 0.5 / 0.2 / 0.8) or CUDA events when
triton is missing. CPU: a few timed rounds after one warm-up, median and p20/p80 of wall time.
Every timer reads after a device synchronisation.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

COLUMNS = [
    "op",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "p50",
    "p20",
    "p80",
    "config_json",
    "device",
    "torch",
    "triton",
    "commit",
    "timestamp",
]


def device_name(device: str = "cpu") -> str:
    """Readable name of the device the benchmark runs on (GPU model or CPU model and threads)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], object], device: str = "cpu", rounds: int = 5, warmup: int = 1
) -> tuple[float, float, float]:
    """(p50, p20, p80) seconds of ``fn()``."""
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench

            for _ in range(max(warmup, 1)):
                fn()
            sync(device)
            p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(100, rounds * 20))
            return p50 / 1e3, p20 / 1e3, p80 / 1e3
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    t = torch.tensor(samples, dtype=torch.float64)
    return float(t.quantile(0.5)), float(t.quantile(0.2)), float(t.quantile(0.8))


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: str = "cpu", rounds: int = 5, warmup: int = 1
) -> dict[str, tuple[float, float, float]]:
    """(p50, p20, p80) seconds per provider, timed round-robin so that a noisy neighbour on a shared
    machine slows every provider alike instead of whichever happened to run at the time."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    out = {}
    for name, values in samples.items():
        t = torch.tensor(values, dtype=torch.float64)
        out[name] = (float(t.quantile(0.5)), float(t.quantile(0.2)), float(t.quantile(0.8)))
    return out


def recall(idx: torch.Tensor, exact_idx: torch.Tensor) -> float:
    """Mean fraction of the exact top-K ids (``exact_idx``, -1 = none) found in ``idx`` ([..., K] each)."""
    hits = (idx.unsqueeze(-1) == exact_idx.unsqueeze(-2)).any(dim=-2) & (exact_idx >= 0)
    return float(hits.sum()) / max(1, int((exact_idx >= 0).sum()))


def pedantic(benchmark, fn: Callable[[], object], device: str, rounds: int, extra: dict) -> None:
    """Times ``fn`` with pytest-benchmark (one warm-up, ``rounds`` synchronised rounds) and records
    ``extra`` and the device name with the result."""

    def timed():
        fn()
        sync(device)

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({**extra, "device": device_name(device)})


def row(
    op: str,
    provider: str,
    metric: str,
    unit: str,
    x_name: str,
    x_value,
    value3,
    config: dict,
    device: str,
    mode: str = "fwd",
) -> dict:
    p50, p20, p80 = value3
    v = versions()
    return {
        "op": op,
        "provider": provider,
        "mode": mode,
        "metric": metric,
        "unit": unit,
        "x_name": x_name,
        "x_value": x_value,
        "p50": f"{p50:.6g}",
        "p20": f"{p20:.6g}",
        "p80": f"{p80:.6g}",
        "config_json": json.dumps(config, sort_keys=True),
        "device": device_name(device),
        "torch": v["torch"],
        "triton": v["triton"],
        "commit": git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_rows(rows: list[dict], out_dir: os.PathLike, device: str, stem: str | None = None) -> Path:
    """Appends rows to ``<out_dir>/<stem or device slug>.csv`` (header written once)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem or slug(device_name(device))}.csv"
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
