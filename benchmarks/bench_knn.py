"""Exact L2 k-nearest-neighbour search at PatchCore's scale: ``raid_fast.knn`` / ``raid_fast.Index``
against faiss-cpu ``IndexFlatL2`` and ``torch.cdist`` + ``topk``.

Providers: ``knn`` (one call with the bank; the bank's search copy is reused across calls, as in
PatchCore's scoring loop), ``knn_cold`` (the same with the copy rebuilt every call), ``index``
(``raid_fast.Index``, prepared once), ``knn_float32`` (``knn`` without the bfloat16 candidate filter
of ``raid_fast.bf16_filter``, which ``knn`` and ``index`` use where the CPU has bfloat16 dot
products), ``faiss`` (``IndexFlatL2``, when faiss-cpu is importable), ``cdist_topk`` (plain torch). Workloads: ``patchcore`` is anomalib PatchCore's memory bank for one
MVTec class with WideResNet-50 features (15,753 x 1,536 after 1 % coreset subsampling) and the
784 patches of one 224-px image, K = 1; ``small`` is a CI-sized stand-in. Data are random
non-negative vectors (post-ReLU features); every provider's neighbours are checked against
``torch.cdist`` in float64 before anything is timed.

``python -m benchmarks.bench_knn --size patchcore --out benchmarks/results`` for the CSV rows and
the ratios; ``pytest benchmarks --benchmark-only`` times the small workload.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

import pytest
import torch

import raid_fast
from benchmarks import _bench
from raid_fast import bf16_filter

try:
    import faiss
except ImportError:  # faiss-cpu is an optional baseline
    faiss = None


@dataclass(frozen=True)
class Workload:
    n: int
    m: int
    d: int
    k: int


WORKLOADS = {
    "small": Workload(n=4000, m=196, d=384, k=1),
    "patchcore": Workload(n=15753, m=784, d=1536, k=1),
}
PROVIDERS = ("knn", "knn_cold", "index", "knn_float32", "faiss", "cdist_topk")


def data(w: Workload, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(w.n, w.d, generator=g).relu_()
    queries = torch.randn(w.m, w.d, generator=g).relu_()
    return queries.to(device), bank.to(device)


def providers() -> list[str]:
    return [p for p in PROVIDERS if p != "faiss" or faiss is not None]


def setup(w: Workload, provider: str, device: str = "cpu"):
    """A zero-argument function returning (dist, idx) of ``provider`` on the workload."""
    queries, bank = data(w, device)
    if provider == "knn":
        return lambda: raid_fast.knn(queries, bank, w.k)
    if provider == "knn_cold":
        return lambda: raid_fast.knn(queries, bank.clone(), w.k)
    if provider == "knn_float32":

        def run():
            saved, bf16_filter.MODE = bf16_filter.MODE, "off"
            try:
                return raid_fast.knn(queries, bank, w.k)
            finally:
                bf16_filter.MODE = saved

        return run
    if provider == "index":
        index = raid_fast.Index(bank, metric="l2")
        return lambda: index.search(queries, w.k)
    if provider == "faiss":
        index = faiss.IndexFlatL2(w.d)
        index.add(bank.cpu().numpy())
        q = queries.cpu().numpy()

        def run():
            dist, idx = index.search(q, w.k)
            return torch.from_numpy(dist), torch.from_numpy(idx)

        return run
    if provider == "cdist_topk":

        def run():
            return torch.cdist(queries, bank).topk(w.k, dim=1, largest=False)

        return run
    msg = f"unknown provider {provider!r}; known: {PROVIDERS}"
    raise ValueError(msg)


def gate(w: Workload, provider: str, device: str = "cpu") -> None:
    """Fails unless the provider finds the exact neighbours (float64 brute force; ties by distance)."""
    queries, bank = data(w, device)
    exact = torch.cdist(queries.double(), bank.double())  # [M, N]
    _, idx = setup(w, provider, device)()
    idx = idx.to(exact.device).long()
    best = exact.topk(w.k, dim=1, largest=False).values[:, -1:]  # [M, 1]
    got = exact.gather(1, idx)
    if not bool((got <= best * (1 + 1e-6) + 1e-9).all()):
        msg = f"{provider}: neighbours differ from the exact search; refusing to time a wrong result"
        raise AssertionError(msg)


def run(size: str, device: str, out_dir: str | None, rounds: int) -> list[dict]:
    w = WORKLOADS[size]
    names = providers()
    for name in names:
        gate(w, name, device)
    times = _bench.time_interleaved({name: setup(w, name, device) for name in names}, device, rounds=rounds)
    flop = 2.0 * w.m * w.n * w.d
    rows = []
    for name, t in times.items():
        cfg = {**asdict(w), "gflops": flop / t[0] / 1e9}
        rows.append(_bench.row("knn_l2", name, "time", "s", "workload", size, t, cfg, device))
        print(
            f"knn {size:<10} {name:<11} {t[0] * 1e3:9.1f} ms  (p20 {t[1] * 1e3:.1f}, p80 {t[2] * 1e3:.1f})  {cfg['gflops']:.0f} GFLOP/s"
        )
    for base in ("faiss", "cdist_topk"):
        if base in times:
            for name in ("knn", "knn_cold", "index", "knn_float32"):
                print(f"  {name} vs {base}: {times[base][0] / times[name][0]:.2f}x")
    if out_dir is not None:
        print(f"wrote {len(rows)} rows to {_bench.write_rows(rows, out_dir, device)}")
    return rows


@pytest.mark.parametrize("provider", PROVIDERS)
def test_knn_l2(benchmark, bench_rounds, provider):
    if provider not in providers():
        pytest.skip("faiss-cpu is not installed")
    w = WORKLOADS["small"]
    gate(w, provider)
    _bench.pedantic(benchmark, setup(w, provider), "cpu", bench_rounds, asdict(w))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(WORKLOADS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="folder for the CSV rows (benchmarks/results)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    run(args.size, args.device, args.out, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
