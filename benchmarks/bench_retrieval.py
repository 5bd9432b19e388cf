"""Retrieval benchmarks: hierarchical vs exact flat retrieve (+ cost volume), and faiss IVF-Flat.

Providers: ``hierarchical``, ``flat_single`` (the routed class), ``flat_multi`` (every class) through
``raid_fast.retrieve``; ``matmul_topk``, the plain torch baseline of flat multi-class search (one
float32 matmul per block of query rows, then ``torch.topk``); ``faiss_ivf`` on the CPU; on a GPU
also ``hierarchical_tf32x3`` and ``flat_multi_tf32x3``, the Triton search tiles on TF32 tensor cores
(``RAID_FAST_DOT_PRECISION``), and ``flat_multi_filter`` / ``flat_multi_filter_tf32x3`` /
``flat_multi_filter_fp16``, the threshold-filtered flat search (``RAID_FAST_FLAT_SEARCH``), checked
against the reference like the others.

Workloads (the paper's MVTec settings): ``mvtec256`` (15 classes x 80 templates x 18x18 tokens, D = 384,
S = 50, P = 5, K = 150) and ``mvtec448`` (32x32 tokens); ``small`` is a CI-sized stand-in.
Tokens are random unit vectors (timing only); recall@K of each mode against exact flat search over
the routed class is printed beside every time, and each provider is checked against the
reference before it is timed.

Script: ``python -m benchmarks.bench_retrieval --size mvtec256 --out benchmarks/results``;
suite: ``pytest benchmarks --benchmark-only`` (``--bench-size full`` for ``mvtec256``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

import raid_fast as rf
from benchmarks import _bench


@dataclass(frozen=True)
class Workload:
    classes: int
    templates: int
    grid: int
    dim: int = 384
    n_semantic: int = 50
    nprobe: int = 5
    k: int = 150
    batch: int = 1

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid


WORKLOADS = {
    "small": Workload(classes=3, templates=8, grid=12, dim=64, n_semantic=10, nprobe=3, k=50),
    "mvtec256": Workload(classes=15, templates=80, grid=18),
    "mvtec448": Workload(classes=15, templates=80, grid=32),
}


@lru_cache(maxsize=2)
def _database(w: Workload, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n_img = w.classes * w.templates
    patch = torch.randn(n_img, w.tokens_per_image, w.dim, generator=gen)
    labels = torch.arange(n_img) // w.templates
    cls = torch.randn(n_img, w.dim, generator=gen) + 4 * F.one_hot(labels % w.dim, w.dim).float()
    # built where it is searched: on a GPU this also runs the CUDA KMeans
    db = rf.TokenDatabase.build(
        patch.to(device), cls.to(device), labels=labels, n_semantic=w.n_semantic, kmeans_iters=5, seed=seed
    )
    return db, cls[labels == 0].to(device)


def make_database(w: Workload, device: str, seed: int = 0):
    """Random unit-vector templates clustered into the hierarchy (5 Lloyd iterations suffice for
    timing), and a batch of random queries routed to class 0: (db, queries [B, L, D], cls [B, D])."""
    db, class0_cls = _database(replace(w, batch=1), device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    queries = torch.randn(w.batch, w.tokens_per_image, w.dim, generator=gen).to(device)
    query_cls = class0_cls[torch.arange(w.batch) % class0_cls.shape[0]]
    return db, queries, query_cls


def faiss_ivf(db, class_id: int):
    """faiss IndexIVFFlat over one class with our prototypes as the coarse quantizer and our lists."""
    import faiss

    s = int(db.n_semantic[class_id])
    quantizer = faiss.IndexFlatIP(db.dim)
    quantizer.add(db.semantic_prototypes[class_id, :s].cpu().numpy())
    index = faiss.IndexIVFFlat(quantizer, db.dim, s, faiss.METRIC_INNER_PRODUCT)
    lo, hi = int(db.class_offsets[class_id]), int(db.class_offsets[class_id + 1])
    index.add_with_ids(db.tokens[lo:hi].cpu().numpy(), torch.arange(lo, hi).numpy())
    return index


def _with_kernel_setting(fn, module: str, name: str, value: str):
    # fn with a module-level switch of raid_fast.kernels set while it runs
    import importlib

    mod = importlib.import_module(f"raid_fast.kernels.{module}")

    def run():
        setattr(mod, name, value)
        try:
            fn()
        finally:
            setattr(mod, name, None)

    return run


# provider suffix -> (kernel module, switch, value); a provider may stack them (flat_multi_filter_tf32x3)
VARIANTS = {
    "_tf32x3": ("cosine_topk", "DOT_PRECISION", "tf32x3"),
    "_filter": ("cosine_filter", "FLAT_SEARCH", "filter"),
    "_filter_fp16": ("cosine_filter", "FLAT_SEARCH", "filter_fp16"),
}


def setup(w: Workload, provider: str, device: str):
    """(fn, result) for one provider; fn() runs one retrieval of the query batch + cost volume."""
    db, q, qc = make_database(w, device)
    out = {}
    for suffix, setting in VARIANTS.items():
        if provider.endswith(suffix):
            fn, out = setup(w, provider.removesuffix(suffix), device)
            return _with_kernel_setting(fn, *setting), out
    if provider in ("hierarchical", "flat_multi", "flat_single"):
        mode = "hierarchical" if provider == "hierarchical" else "flat"
        class_ids = db.classify(qc) if provider == "flat_single" else None

        def fn():
            res = rf.retrieve(q, db, query_cls=qc, class_ids=class_ids, k=w.k, nprobe=w.nprobe, mode=mode)
            out["cost"] = res.cost_volume(w.grid, w.grid)
            out["res"] = res

    elif provider == "matmul_topk":
        qn = F.normalize(q, dim=-1).reshape(-1, w.dim)  # [B * L, D]
        # whole rows of the similarity matrix, as many as fit ~4 GB (GPU) / 512 MB (CPU)
        budget = 2**30 if device.startswith("cuda") else 2**27
        rows = max(1, budget // max(1, db.n_tokens))

        def fn():
            dist, idx = [], []
            for s in range(0, qn.shape[0], rows):
                top = torch.topk(qn[s : s + rows] @ db.tokens.T, w.k, dim=1)  # [rows, K]
                dist.append(1.0 - top.values)
                idx.append(top.indices)
            out["idx"] = torch.cat(idx).view(w.batch, -1, w.k)
            out["cost"] = torch.cat(dist).view(w.batch, -1, w.k).permute(0, 2, 1).reshape(w.batch, w.k, w.grid, w.grid)

    elif provider == "faiss_ivf":
        class_id = int(db.classify(qc)[0])
        index = faiss_ivf(db, class_id)
        index.nprobe = w.nprobe
        qn = F.normalize(q, dim=-1).reshape(-1, w.dim).cpu().numpy()

        def fn():
            sims, ids = index.search(qn, w.k)
            dist = torch.from_numpy(1.0 - sims).view(w.batch, -1, w.k)
            out["cost"] = dist.permute(0, 2, 1).reshape(w.batch, w.k, w.grid, w.grid)
            out["idx"] = torch.from_numpy(ids).view(w.batch, -1, w.k)

    else:
        msg = f"unknown provider {provider!r}"
        raise ValueError(msg)
    return fn, out


def providers(device: str) -> list[str]:
    names = ["hierarchical", "flat_single", "flat_multi", "matmul_topk"]
    if device == "cpu" and importable("faiss"):
        names.append("faiss_ivf")
    if device.startswith("cuda"):
        names += [
            "hierarchical_tf32x3",
            "flat_multi_tf32x3",
            "flat_multi_filter",
            "flat_multi_filter_tf32x3",
            "flat_multi_filter_fp16",
        ]
    return names


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def gate(w: Workload, device: str, names: list[str] | None = None) -> None:
    """Hierarchical must equal faiss IVF-Flat on the same lists (when faiss is here), and the
    flat paths among ``names`` (default: every provider here) must equal the exact reference,
    before anything is timed."""
    names = providers(device) if names is None else names
    db, q, qc = make_database(w, device)
    res = rf.retrieve(q, db, query_cls=qc, k=w.k, mode="flat", class_ids=db.classify(qc))
    ref = rf.retrieve(q, db, query_cls=qc, k=w.k, mode="flat", class_ids=db.classify(qc), backend="torch")
    if not torch.allclose(res.dist, ref.dist, atol=1e-4):
        msg = "correctness gate failed: flat retrieval differs from the torch reference"
        raise AssertionError(msg)
    if device.startswith("cuda"):
        # each GPU variant of flat_multi is checked over every class and, cheaper, over one class
        variants = [name.removeprefix("flat_multi") for name in names if name.startswith("flat_multi_")]
        multi_ref = rf.retrieve(q, db, query_cls=qc, k=w.k, mode="flat", backend="torch") if variants else None
        checks = [("flat_single_tf32x3", ref)] + [
            (f"flat_{scope}{variant}", expected)
            for variant in variants
            for scope, expected in (("single", ref), ("multi", multi_ref))
        ]
        for provider, expected in checks:
            fn, out = setup(w, provider, device)
            fn()
            if not torch.allclose(out["res"].dist, expected.dist, atol=1e-4):
                worst = float((out["res"].dist - expected.dist).abs().max())
                msg = f"correctness gate failed: {provider} differs from the torch reference by {worst:.3g}"
                raise AssertionError(msg)
    if "faiss_ivf" in providers(device):
        fn, out = setup(w, "faiss_ivf", device)
        fn()
        hier = rf.retrieve(q, db, query_cls=qc, k=w.k, nprobe=w.nprobe)
        faiss_cost = out["cost"].to(device)
        if not torch.allclose(hier.cost_volume(w.grid, w.grid), faiss_cost, atol=1e-4):
            msg = "correctness gate failed: hierarchical retrieval differs from faiss IVF-Flat"
            raise AssertionError(msg)


def run(size: str, device: str, out_dir: str | None, rounds: int = 5, only: list[str] | None = None) -> list[dict]:
    """Gates, times and reports the providers of this device (``only``: those of them)."""
    w = WORKLOADS[size]
    names = [name for name in providers(device) if only is None or name in only]
    gate(w, device, names)
    db, q, qc = make_database(w, device)
    exact = rf.retrieve(q, db, query_cls=qc, k=w.k, mode="flat", class_ids=db.classify(qc))
    rows, times = [], {}
    setups = {provider: setup(w, provider, device) for provider in names}
    # on a GPU do_bench times each provider on its own; on a shared CPU round-robin is fairer
    if device.startswith("cuda"):
        timed = {name: _bench.time_fn(fn, device, rounds=rounds) for name, (fn, _) in setups.items()}
    else:
        timed = _bench.time_interleaved({name: fn for name, (fn, _) in setups.items()}, device, rounds=rounds)
    for provider, (_, out) in setups.items():
        t = timed[provider]
        idx = out["res"].idx if "res" in out else out["idx"].to(device)
        rec = _bench.recall(idx, exact.idx)
        times[provider] = t[0]
        cfg = {**asdict(w), f"recall@{w.k}": rec, "db_tokens": db.n_tokens}
        rows.append(
            _bench.row(
                "retrieve_cost_volume",
                provider,
                "time_per_image",
                "s",
                "workload",
                size,
                tuple(v / w.batch for v in t),
                cfg,
                device,
            )
        )
        print(
            f"retrieve {size:<9} {provider:<24} {t[0] / w.batch * 1e3:10.3f} ms/image  recall@{w.k} {rec:.4f}",
            flush=True,
        )
    for base in ("flat_multi", "flat_single", "faiss_ivf", "matmul_topk"):
        if base in times:
            print(f"  hierarchical vs {base}: {times[base] / times['hierarchical']:.1f}x faster")
    flats = (
        "flat_multi",
        "flat_multi_tf32x3",
        "flat_multi_filter",
        "flat_multi_filter_tf32x3",
        "flat_multi_filter_fp16",
    )
    for flat in flats:
        if flat in times and "matmul_topk" in times:
            print(f"  {flat} vs matmul_topk: {times['matmul_topk'] / times[flat]:.2f}x faster")
    if out_dir is not None:
        print(f"wrote {len(rows)} rows to {_bench.write_rows(rows, out_dir, device)}")
    return rows


@pytest.fixture(scope="module")
def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "provider",
    [
        "hierarchical",
        "flat_single",
        "flat_multi",
        "matmul_topk",
        "faiss_ivf",
        "hierarchical_tf32x3",
        "flat_multi_tf32x3",
        "flat_multi_filter",
        "flat_multi_filter_tf32x3",
        "flat_multi_filter_fp16",
    ],
)
def test_retrieve(benchmark, bench_size, bench_rounds, bench_device, provider):
    if provider not in providers(bench_device):
        pytest.skip(f"{provider} cannot run on {bench_device} here")
    size = "mvtec256" if bench_size.startswith("full") else "small"
    w = WORKLOADS[size]
    gate(w, bench_device)
    fn, _ = setup(w, provider, bench_device)

    _bench.pedantic(benchmark, fn, bench_device, bench_rounds, asdict(w))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(WORKLOADS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="query images per call")
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    args = parser.parse_args(argv)
    size = args.size
    only = None
    if args.providers is not None:
        only = args.providers.split(",")
        unknown = sorted(set(only) - set(providers(args.device)))
        if unknown:
            parser.error(f"--providers: {unknown} are not providers on {args.device}: {providers(args.device)}")
    if args.batch is not None:
        WORKLOADS[size] = Workload(**{**asdict(WORKLOADS[size]), "batch": args.batch})
    run(size, args.device, args.out, args.rounds, only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
