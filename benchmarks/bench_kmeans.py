"""KMeans benchmarks: raid_fast backends against scikit-learn, the torch reference and flash-kmeans.

Providers: ``cuda`` / ``cpp`` / ``torch`` (float32), ``triton_fp16`` / ``triton_bf16`` (the GPU's
one-pass half-precision Lloyd loop, ``raid_fast.kmeans(precision=...)``; the rounding of the points
is inside the timed call), ``sklearn`` and ``flash_kmeans`` when importable.

Workloads (the project's KMeans targets): one class of ``mvtec448`` (81,920 x 384 -> 50, 25 iterations)
and all 15 classes batched; ``small`` is a CI-sized stand-in. Data are random unit vectors (timing
does not depend on content); every provider starts from the same centroids and runs the same
number of iterations, and its final inertia is checked against the reference before it is timed.

Run as a script for the CSV and the ratio table (``python -m benchmarks.bench_kmeans --size
full``), or under ``pytest benchmarks --benchmark-only`` (``--bench-size full`` for full size).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

import pytest
import torch

import raid_fast
from benchmarks import _bench


@dataclass(frozen=True)
class Workload:
    groups: int
    n: int
    d: int
    k: int
    niter: int

    @property
    def flops_per_iter(self) -> float:
        # assignment GEMM form: 2 N k D multiply-adds per group
        return 2.0 * self.groups * self.n * self.k * self.d


WORKLOADS = {
    "small": Workload(groups=1, n=8192, d=384, k=50, niter=5),
    "small15": Workload(groups=3, n=4096, d=384, k=50, niter=5),
    "full": Workload(groups=1, n=81920, d=384, k=50, niter=25),
    "full15": Workload(groups=15, n=81920, d=384, k=50, niter=25),
}


def make_data(w: Workload, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors [G, N, D] and shared initial centroids [G, k, D] (the first k points)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(w.groups, w.n, w.d, generator=gen), dim=-1)
    init = x[:, torch.randperm(w.n, generator=gen)[: w.k]].clone()
    return x.to(device), init.to(device)


def _sklearn_fit(x: torch.Tensor, init: torch.Tensor, niter: int) -> float:
    from sklearn.cluster import KMeans

    total = 0.0
    for g in range(x.shape[0]):
        km = KMeans(init.shape[1], init=init[g].numpy(), n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd")
        total += float(km.fit(x[g].numpy()).inertia_)
    return total


def _flash_kmeans_fit(x: torch.Tensor, init: torch.Tensor, niter: int) -> float:
    from flash_kmeans import batch_kmeans_Euclid

    ids, centers, _ = batch_kmeans_Euclid(x, n_clusters=init.shape[1], max_iters=niter, tol=0.0, init_centroids=init)
    return float((x - torch.gather(centers, 1, ids.unsqueeze(-1).expand_as(x))).square().sum())


HALF = {"triton_fp16": "fp16", "triton_bf16": "bf16"}


def providers(device: str) -> list[str]:
    """Providers that can run here: raid_fast backends plus importable baselines."""
    table = raid_fast.backends()["kmeans_step"]
    names = [b for b in ("cuda", "cpp", "torch") if table.get(b) == "ok" and (b == "cuda") == device.startswith("cuda")]
    if device.startswith("cuda") and table.get("triton") == "ok":
        names += list(HALF)
    if device == "cpu" and importable("sklearn"):
        names.append("sklearn")
    if device.startswith("cuda") and importable("flash_kmeans"):
        names.append("flash_kmeans")
    return names


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def setup(w: Workload, provider: str, device: str):
    """Returns (fn, final_inertia_fn): fn runs the whole fit, final_inertia_fn() reads its result."""
    x, init = make_data(w, device)
    result = {}

    if provider == "sklearn":
        xc, ic = x.cpu(), init.cpu()

        def fn():
            result["obj"] = _sklearn_fit(xc, ic, w.niter)

    elif provider == "flash_kmeans":

        def fn():
            result["obj"] = _flash_kmeans_fit(x, init, w.niter)

    elif provider in HALF:

        def fn():
            res = raid_fast.kmeans(
                x, w.k, niter=w.niter, init_centroids=init, precision=HALF[provider], backend="triton"
            )
            result["obj"] = res.obj[-1]

    else:

        def fn():
            res = raid_fast.kmeans(x, w.k, niter=w.niter, init_centroids=init, backend=provider)
            result["obj"] = res.obj[-1]

    def final_inertia() -> float:
        obj = result["obj"]
        return float(obj.sum()) if isinstance(obj, torch.Tensor) else float(obj)

    return fn, final_inertia


def gate(provider: str, device: str) -> None:
    """Refuses to time a provider whose result disagrees with the reference on a small case."""
    w = Workload(groups=2, n=3000, d=64, k=12, niter=4)
    fn, inertia = setup(w, provider, device)
    fn()
    x, init = make_data(w, "cpu")
    ref = float(raid_fast.kmeans(x, w.k, niter=w.niter, init_centroids=init, backend="torch").obj[-1].sum())
    got = inertia()
    if abs(got - ref) > 1e-3 * ref:
        msg = f"correctness gate failed for {provider}: final inertia {got:.6g} vs reference {ref:.6g}"
        raise AssertionError(msg)


def run(size: str, device: str, out_dir: str | None, rounds: int = 3) -> list[dict]:
    w = WORKLOADS[size]
    names = providers(device)
    if device == "cpu" and w.n * w.groups > 100_000 and "torch" in names:
        # the float64 reference takes minutes per round at this size on 2 cores: timed once, apart
        names.remove("torch")
        slow = ["torch"]
    else:
        slow = []
    fns, inertia = {}, {}
    for provider in names + slow:
        gate(provider, device)
        fns[provider], inertia[provider] = setup(w, provider, device)
    # on a GPU do_bench times each provider on its own; on a shared CPU round-robin is fairer
    if device.startswith("cuda"):
        times = {name: _bench.time_fn(fns[name], device, rounds=rounds) for name in names}
    else:
        times = _bench.time_interleaved({name: fns[name] for name in names}, device, rounds=rounds)
    for name in slow:
        times[name] = _bench.time_fn(fns[name], device, rounds=1, warmup=0)
    rows = []
    for name, t in times.items():
        cfg = {**asdict(w), "inertia": inertia[name](), "gflops": w.flops_per_iter * w.niter / t[0] / 1e9}
        rows.append(_bench.row("kmeans_fit", name, "time", "s", "workload", size, t, cfg, device))
        print(
            f"kmeans {size:<8} {name:<12} {t[0] * 1e3:10.2f} ms  (p20 {t[1] * 1e3:.2f}, p80 {t[2] * 1e3:.2f})  "
            f"inertia {cfg['inertia']:.6g}  {cfg['gflops']:.1f} GFLOP/s",
            flush=True,
        )
    ref = inertia["torch"]() if "torch" in inertia else None
    for name in times:
        for base in ("sklearn", "torch", "flash_kmeans"):
            if base in times and base != name and name in ("cuda", "cpp", *HALF):
                print(f"  {name} vs {base}: {times[base][0] / times[name][0]:.2f}x faster")
        if ref:
            print(f"  {name} inertia vs torch reference: {100 * (inertia[name]() - ref) / ref:+.4f}%")
    if out_dir is not None:
        path = _bench.write_rows(rows, out_dir, device)
        print(f"wrote {len(rows)} rows to {path}")
    return rows


@pytest.fixture(scope="module")
def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("provider", ["cuda", "triton_fp16", "triton_bf16", "cpp", "torch", "sklearn", "flash_kmeans"])
def test_kmeans_fit(benchmark, bench_size, bench_rounds, bench_device, provider):
    if provider not in providers(bench_device):
        pytest.skip(f"{provider} cannot run on {bench_device} here")
    w = WORKLOADS[bench_size]
    if provider == "torch" and bench_device == "cpu" and bench_size.startswith("full"):
        pytest.skip("the float64 reference takes minutes at full size on CPU; see the script mode")
    gate(provider, bench_device)
    fn, inertia = setup(w, provider, bench_device)

    _bench.pedantic(benchmark, fn, bench_device, bench_rounds, asdict(w))
    benchmark.extra_info["inertia"] = inertia()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(WORKLOADS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for the CSV rows (benchmarks/results)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.size, args.device, args.out, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
