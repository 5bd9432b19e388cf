"""How retrieval cost grows: flat vs hierarchical against database size and nprobe, as CSV and PNG.

Three sweeps, one query image (18 x 18 tokens, D = 384, K = 150, S = 50 semantic prototypes):

- templates per class 4 .. 320 with 15 classes (the MVTec-AD setting);
- classes 1 .. 36 with 80 templates each (36: the multi-dataset setting, MVTec-AD + VisA + MPDD + BTAD);
- nprobe 1 .. 50 at 15 classes x 80 templates.

Flat retrieval scans every token of the database; hierarchical scores the class prototypes, the
S prototypes of the routed class and the ``nprobe`` lists they select. Times are retrieve + cost
volume (median of interleaved rounds). recall@K is measured against exact flat search in the
query's class.

Data: per class, tokens drawn around 512 "modes" grouped in 16 "parts" (noisy unit vectors, so that
near neighbours share a mode and wider ones a part, as real patch tokens share a texture or an
object part); random unit vectors would make every neighbour list arbitrary and recall
meaningless. Timing does not depend on the content. The nprobe sweep also reports recall on
real backbone features of the embedded dataset (efficientnet_lite0, 3 classes).

Usage: ``python -m benchmarks.scaling --out benchmarks/results`` (``--quick`` for a CI-sized run).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import raid_fast as rf
from benchmarks import _bench


@dataclass(frozen=True)
class Setting:
    classes: int = 15
    templates: int = 80
    grid: int = 18
    dim: int = 384
    n_semantic: int = 50
    nprobe: int = 5
    k: int = 150
    parts: int = 16  # coarse "parts" per class in the synthetic data
    modes: int = 512  # fine modes per class, spread around the parts
    # offsets chosen so that hierarchical recall against nprobe follows the real-feature curve's shape
    spread: float = 2.0  # norm of a mode's offset from its part (cosine to the part ~0.45)
    noise: float = 1.5  # norm of a token's offset from its mode (cosine to the mode ~0.55)


FULL = {
    "templates": [4, 10, 20, 40, 80, 160, 320],
    "classes": [1, 3, 6, 15, 24, 36],
    "nprobe": [1, 2, 3, 5, 10, 20, 50],
}
QUICK = {"templates": [4, 8], "classes": [1, 3], "nprobe": [1, 5]}


def class_modes(s: Setting, gen: torch.Generator) -> torch.Tensor:
    """[M, D] unit modes of one class: ``s.parts`` random directions, each with M / parts modes
    around it, so that a token's near neighbours share its mode and its wider ones its part."""
    parts = F.normalize(torch.randn(s.parts, s.dim, generator=gen), dim=1)
    which = torch.arange(s.modes) % s.parts
    offsets = s.spread / s.dim**0.5 * torch.randn(s.modes, s.dim, generator=gen)
    return F.normalize(parts[which] + offsets, dim=1)


def clustered_tokens(n_img: int, s: Setting, modes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[n_img, L, D] unit tokens, each a random mode of ``modes [M, D]`` plus noise."""
    n = n_img * s.grid * s.grid
    which = torch.randint(modes.shape[0], (n,), generator=gen)
    x = modes[which] + s.noise / s.dim**0.5 * torch.randn(n, s.dim, generator=gen)
    return F.normalize(x, dim=1).view(n_img, s.grid * s.grid, s.dim)


def make_case(s: Setting, seed: int = 0, device: str = "cpu"):
    """Database of ``s.classes`` x ``s.templates`` synthetic templates, and one query of class 0, on
    ``device`` (the data are drawn on the CPU, so every device sees the same tokens)."""
    gen = torch.Generator().manual_seed(seed)
    modes = torch.stack([class_modes(s, gen) for _ in range(s.classes)])  # [C, M, D]
    centres = torch.randn(s.classes, s.dim, generator=gen)
    patch = torch.cat([clustered_tokens(s.templates, s, modes[c], gen) for c in range(s.classes)])
    labels = torch.arange(s.classes).repeat_interleave(s.templates)
    cls = 4 * centres[labels] + torch.randn(labels.numel(), s.dim, generator=gen)
    db = rf.TokenDatabase.build(
        patch.to(device), cls.to(device), labels=labels, n_semantic=s.n_semantic, kmeans_iters=10, seed=seed
    )
    query = clustered_tokens(1, s, modes[0], gen)
    query_cls = 4 * centres[:1] + torch.randn(1, s.dim, generator=gen)
    return db, query.to(device), query_cls.to(device)


def measure(db, query, query_cls, s: Setting, device: str, rounds: int, modes=("flat", "hierarchical")) -> dict:
    """{mode: (seconds, recall@K)} of one retrieval + cost volume of the query."""
    exact = rf.retrieve(query, db, class_ids=db.classify(query_cls), k=s.k, mode="flat").idx
    nprobe = min(s.nprobe, db.s_max)
    fns, results = {}, {}
    for mode in modes:

        def fn(mode=mode):
            res = rf.retrieve(query, db, query_cls=query_cls, k=s.k, nprobe=nprobe, mode=mode)
            res.cost_volume(s.grid, s.grid)
            results[mode] = res

        fns[mode] = fn
    times = _bench.time_interleaved(fns, device, rounds=rounds)
    for mode in modes:
        # a wrong fast path must fail here instead of reporting a time
        want = rf.retrieve(query, db, query_cls=query_cls, k=s.k, nprobe=nprobe, mode=mode, backend="torch")
        if not torch.allclose(results[mode].dist, want.dist, atol=1e-4):
            msg = f"correctness gate failed: {mode} retrieval differs from the torch reference"
            raise AssertionError(msg)
    return {mode: (times[mode][0], _bench.recall(results[mode].idx, exact)) for mode in modes}


def real_feature_recall(nprobes: list[int], k: int, image_size: int = 256) -> list[tuple[int, float]]:
    """recall@K of hierarchical retrieval on efficientnet_lite0 tokens of the embedded dataset."""
    import tempfile

    from raid_fast.app.pipelines import encode
    from raid_fast.data import load_datasets, make_embedded_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = make_embedded_dataset(Path(tmp) / "embedded", image_size=image_size)
        backbone = rf.load_backbone("efficientnet_lite0", image_size=image_size)
        train = load_datasets([root], split="train", image_size=image_size)
        test = load_datasets([root], split="test", image_size=image_size)
        tokens, cls, _ = encode(backbone, train, list(range(len(train))), progress=False)
        db = rf.TokenDatabase.build(tokens, cls, labels=torch.as_tensor(train.class_ids), n_semantic=50)
        q, qc, _ = encode(backbone, test, list(range(len(test))), progress=False)
    exact = rf.retrieve(q, db, class_ids=db.classify(qc), k=k, mode="flat").idx
    out = []
    for p in nprobes:
        p_eff = min(p, int(db.n_semantic.min()))
        res = rf.retrieve(q, db, query_cls=qc, k=k, nprobe=p_eff)
        out.append((p, _bench.recall(res.idx, exact)))
    return out


COLUMNS = ["sweep", "x", "mode", "seconds", "recall", "db_tokens", "classes", "templates", "nprobe", "data"]


def run(sweeps: dict, device: str, rounds: int, base: Setting, with_real: bool = True) -> list[dict]:
    rows = []

    def add(sweep, x, s, db, measured):
        for mode, (sec, rec) in measured.items():
            rows.append(
                {
                    "sweep": sweep,
                    "x": x,
                    "mode": mode,
                    "seconds": f"{sec:.6g}",
                    "recall": f"{rec:.4f}",
                    "db_tokens": db.n_tokens,
                    "classes": s.classes,
                    "templates": s.templates,
                    "nprobe": s.nprobe,
                    "data": "synthetic clustered",
                }
            )
            print(
                f"{sweep:<9} {x:>5} {mode:<12} {sec * 1e3:10.2f} ms  recall@{s.k} {rec:.3f}  ({db.n_tokens} tokens)",
                flush=True,
            )

    for sweep in ("templates", "classes"):
        for x in sweeps[sweep]:
            s = replace(base, **{sweep: x})
            t0 = time.perf_counter()
            db, q, qc = make_case(s, device=device)
            print(f"  built {db} in {time.perf_counter() - t0:.1f} s", flush=True)
            add(sweep, x, s, db, measure(db, q, qc, s, device, rounds))
            del db
    db, q, qc = make_case(base, device=device)
    for x in sweeps["nprobe"]:
        s = replace(base, nprobe=min(x, base.n_semantic))
        modes = ("flat", "hierarchical") if x == sweeps["nprobe"][0] else ("hierarchical",)
        add("nprobe", x, s, db, measure(db, q, qc, s, device, rounds, modes))
    if with_real:
        for p, rec in real_feature_recall(sweeps["nprobe"], base.k):
            rows.append(
                {
                    "sweep": "nprobe",
                    "x": p,
                    "mode": "hierarchical",
                    "seconds": "",
                    "recall": f"{rec:.4f}",
                    "db_tokens": "",
                    "classes": 3,
                    "templates": 24,
                    "nprobe": p,
                    "data": "embedded, efficientnet_lite0",
                }
            )
            print(f"nprobe    {p:>5} real features  recall@{base.k} {rec:.3f}", flush=True)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path, title: str, base: Setting) -> None:
    """Latency (top) and recall@K (bottom) of each sweep, flat against hierarchical."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex="col")
    labels = {
        "templates": f"templates per class ({base.classes} classes)",
        "classes": f"classes ({base.templates} templates each)",
        "nprobe": f"nprobe ({base.classes} x {base.templates} templates)",
    }
    styles = {"flat": ("tab:red", "s"), "hierarchical": ("tab:blue", "o")}
    for col, sweep in enumerate(("templates", "classes", "nprobe")):
        top, bottom = axes[0, col], axes[1, col]
        for mode, (color, marker) in styles.items():
            pts = [r for r in rows if r["sweep"] == sweep and r["mode"] == mode and r["data"] == "synthetic clustered"]
            if not pts:
                continue
            xs = [float(r["x"]) for r in pts]
            if sweep == "nprobe" and mode == "flat":
                # flat does not depend on nprobe: one measured value drawn across the sweep
                xs_all = [
                    float(r["x"])
                    for r in rows
                    if r["sweep"] == "nprobe" and r["mode"] == "hierarchical" and r["seconds"]
                ]
                sec = float(pts[0]["seconds"]) * 1e3
                top.plot(xs_all, [sec] * len(xs_all), color=color, ls="--", label="flat (exact, whole database)")
                continue
            top.plot(xs, [float(r["seconds"]) * 1e3 for r in pts], color=color, marker=marker, label=mode)
            if mode == "hierarchical":
                # flat search is exact over the whole database; how often other classes' tokens
                # displace in-class ones depends on the data, so its recall stays in the CSV only
                bottom.plot(xs, [float(r["recall"]) for r in pts], color=color, marker=marker, label="synthetic")
        real = [r for r in rows if r["sweep"] == sweep and r["data"] != "synthetic clustered"]
        if real:
            bottom.plot(
                [float(r["x"]) for r in real],
                [float(r["recall"]) for r in real],
                color="tab:green",
                marker="^",
                label="real features (embedded dataset)",
            )
        top.set_yscale("log")
        top.set_xscale("log")
        ticks = sorted({float(r["x"]) for r in rows if r["sweep"] == sweep})
        bottom.set_xticks(ticks, [f"{t:g}" for t in ticks])
        bottom.minorticks_off()
        top.set_ylabel("ms per image (retrieve + cost volume)")
        bottom.set_ylabel(f"hierarchical recall@{base.k}\nvs exact in-class search")
        bottom.set_ylim(0, 1.05)
        bottom.set_xlabel(labels[sweep])
        top.grid(True, which="both", alpha=0.3)
        bottom.grid(True, alpha=0.3)
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a CI-sized run (small sweeps, D = 64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-real", action="store_true", help="skip the real-feature recall")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    base = Setting(dim=64, n_semantic=8, k=20, grid=6, classes=3, templates=4) if args.quick else Setting()
    sweeps = QUICK if args.quick else FULL
    if args.device.startswith("cuda"):
        base = replace(base, grid=32)  # mvtec448 tokens on a GPU
    rows = run(sweeps, args.device, args.rounds, base, with_real=not args.no_real and not args.quick)
    stem = f"scaling_{_bench.slug(_bench.device_name(args.device))}" + ("_quick" if args.quick else "")
    out = Path(args.out)
    write_csv(rows, out / f"{stem}.csv")
    title = (
        f"raid_fast retrieval scaling on {_bench.device_name(args.device)}, {_bench.versions()['torch']}: "
        f"{base.grid}x{base.grid} query tokens, D={base.dim}, K={base.k}, S={base.n_semantic}, P={base.nprobe} unless swept"
    )
    plot(rows, out / f"{stem}.png", title, base)
    print(f"wrote {out / f'{stem}.csv'} and {out / f'{stem}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
