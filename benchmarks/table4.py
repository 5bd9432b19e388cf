"""The paper's Table 4: flat vs hierarchical retrieval under three database capacities.

Rows: a PatchCore-style flat 1-NN over the multi-class database (no filter), and RAID with flat
retrieval over the multi-class database, hierarchical retrieval over a single class's database
(the class is given), over the multi-class database (the class is routed by CLS), and over a
4-shot multi-class database.

Two parts, as the paper's numbers mix them:

- **Efficiency**, at full scale with random data (timing does not depend on content): 15 classes x
  80 templates (Table 5's best) of random unit tokens; the backbone is DINOv2 ViT-S/14 and the
  filter the paper's (D = 384, K = 150), both randomly initialised (same FLOPs and time as trained
  weights). ``mvtec256`` (252 px, 18 x 18 tokens) on a CPU, ``mvtec448`` (448 px, 32 x 32) on a
  GPU. Per row, in a fresh process that loads the saved database: seconds per image of retrieval +
  cost volume and of the whole ``predict``, FLOPs per image and peak memory.
- **Accuracy**, with real backbone features on a dataset (the embedded default when none is given):
  I-/P-AUROC of every row, and recall@K of its retrieval against exact search in the query's class.
  Without ``--filter`` (a checkpoint of ``raid-fast train`` for this backbone), RAID rows are
  scored retrieval only and marked so.

FLOPs are counted, not guessed, and shown in two columns: the model (backbone + filter, counted by
``torch.utils.flop_counter`` on one image; the paper's FLOPs column is this one, equal for every
RAID row) and the retrieval (2 D per scored (query token, vector) pair, summed over the vectors each
query actually scored: the whole database for flat search; the class prototypes, the class's
semantic prototypes and the probed lists for hierarchical search).
Memory is the peak of ``torch.cuda.max_memory_allocated`` on a GPU, the peak resident set of the
process on a CPU (Python and torch included). The paper's figures (its own GPU, DINOv2 at 448) are
printed beside ours with the ratio.

Usage: ``python -m benchmarks.table4 [--data ROOT] [--filter CKPT] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import raid_fast as rf
from benchmarks import _bench
from raid_fast.detect.detector import guidance_maps


@dataclass(frozen=True)
class Row:
    method: str
    retrieval: str  # "flat" | "hierarchical"
    capacity: str  # "multi" | "single" | "4-shot"
    k: int = 150
    use_filter: bool = True

    @property
    def name(self) -> str:
        short = {"flat": "Flat", "hierarchical": "Hier."}[self.retrieval]
        return f"{self.method} {short}/{self.capacity}"


ROWS = [
    Row("PatchCore-style 1-NN", "flat", "multi", k=1, use_filter=False),
    Row("RAID", "flat", "multi"),
    Row("RAID", "hierarchical", "single"),
    Row("RAID", "hierarchical", "multi"),
    Row("RAID", "hierarchical", "4-shot"),
]

# Table 4 of the paper: FLOPs (G), memory (GB), inference (s / image), I-AUROC, P-AUROC (MVTec-AD)
PAPER = {
    "PatchCore-style 1-NN Flat/multi": (7.12, 3.46, 0.093, 96.4, 95.7),
    "RAID Flat/multi": (14.2, 6.55, 0.267, 99.4, 98.7),
    "RAID Hier./single": (14.2, 6.52, 0.052, 99.3, 98.7),
    "RAID Hier./multi": (14.2, 6.52, 0.062, 99.4, 98.6),
    "RAID Hier./4-shot": (14.2, 5.28, 0.046, 96.9, 96.9),
}


@dataclass(frozen=True)
class Scale:
    image_size: int
    classes: int = 15
    templates: int = 80
    dim: int = 384
    n_semantic: int = 50
    nprobe: int = 5

    @property
    def grid(self) -> int:
        return self.image_size // 14


SCALES = {"mvtec256": Scale(252), "mvtec448": Scale(448), "small": Scale(56, classes=3, templates=8, n_semantic=8)}


# ----------------------------------------------------------------------------- FLOPs


def retrieval_flops(db: rf.TokenDatabase, queries: torch.Tensor, row: Row, class_ids: torch.Tensor, nprobe: int) -> int:
    """Multiply-add FLOPs (2 D per scored pair) of one retrieval of ``queries [B, L, D]``, counted
    from the vectors scored: the whole database (flat multi), or the class prototypes, the class's
    semantic prototypes and the lists its top-``nprobe`` prototypes select (hierarchical)."""
    b, n_pos, d = queries.shape
    if row.retrieval == "flat":
        return 2 * d * b * n_pos * db.n_tokens
    q = F.normalize(queries.float(), dim=-1)
    routing = 0 if row.capacity == "single" else 2 * d * b * db.n_classes
    total = routing
    sizes = (db.list_offsets[1:] - db.list_offsets[:-1]).cpu()  # [C * S]
    for i in range(b):
        c = int(class_ids[i])
        s = int(db.n_semantic[c])
        protos = db.semantic_prototypes[c, :s]  # [s, D]
        probes = (q[i] @ protos.T).topk(min(nprobe, s), dim=-1).indices.cpu()  # [L, P]
        total += 2 * d * n_pos * s + 2 * d * int(sizes[c * db.s_max + probes].sum())
    return total


def module_flops(fn, *args) -> int:
    """FLOPs of ``fn(*args)`` as counted by torch (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- efficiency


def random_database(scale: Scale, templates: int, device: str, seed: int = 0) -> rf.TokenDatabase:
    gen = torch.Generator().manual_seed(seed)
    n_img = scale.classes * templates
    patch = torch.randn(n_img, scale.grid * scale.grid, scale.dim, generator=gen)
    labels = torch.arange(n_img) // templates
    # CLS tokens around one direction per class, so that routing finds the class
    centres = torch.randn(scale.classes, scale.dim, generator=gen)
    cls = 4 * centres[labels] + torch.randn(n_img, scale.dim, generator=gen)
    return rf.TokenDatabase.build(
        patch.to(device), cls.to(device), labels=labels, n_semantic=scale.n_semantic, kmeans_iters=5, seed=seed
    )


def peak_rss_gb() -> float:
    """High-water resident set of this process. ``VmHWM`` belongs to the process's own address
    space; ``ru_maxrss`` would also carry the parent's peak across fork + exec on Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_efficiency(row: Row, scale: Scale, db_path: str, device: str, rounds: int) -> dict:
    """One row's efficiency in this process (called in a fresh one): times, FLOPs, peak memory."""
    db = rf.TokenDatabase.load(db_path, device=device)
    backbone = rf.load_backbone("dinov2_vits14", pretrained=False, image_size=scale.image_size, device=device)
    filter = rf.GuidedMoEFilter(dim=scale.dim, k=row.k).to(device).eval() if row.use_filter else None
    det = rf.Detector(backbone, db, filter=filter, k=row.k, nprobe=scale.nprobe, mode=row.retrieval)
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, scale.image_size, scale.image_size, generator=gen).to(device)
    with torch.no_grad():
        tokens, cls, grid = backbone(image)
    routed = db.classify(cls)
    class_ids = routed if row.capacity == "single" else None

    def retrieval():
        res = rf.retrieve(
            tokens, db, query_cls=cls, class_ids=class_ids, k=row.k, nprobe=scale.nprobe, mode=row.retrieval
        )
        return res.cost_volume(*grid)

    def predict():
        return det.predict(image, class_ids=class_ids)

    # correctness before speed: the dispatched path must give the torch reference's cost volume
    want = rf.retrieve(
        tokens,
        db,
        query_cls=cls,
        class_ids=class_ids,
        k=row.k,
        nprobe=scale.nprobe,
        mode=row.retrieval,
        backend="torch",
    ).cost_volume(*grid)
    if not torch.allclose(retrieval(), want, atol=1e-4):
        msg = f"correctness gate failed: {row.name} retrieval differs from the torch reference"
        raise AssertionError(msg)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_ret = _bench.time_fn(retrieval, device, rounds=rounds)
    t_pred = _bench.time_fn(predict, device, rounds=rounds)
    flops_backbone = module_flops(backbone, image)
    flops_filter = 0
    if filter is not None:
        res = rf.retrieve(
            tokens, db, query_cls=cls, class_ids=class_ids, k=row.k, nprobe=scale.nprobe, mode=row.retrieval
        )
        guidance = guidance_maps(tokens, res.proto, grid)
        flops_filter = module_flops(filter, guidance, res.cost_volume(*grid))
    flops_retrieval = retrieval_flops(db, tokens, row, routed, scale.nprobe)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
        memory_kind = "cuda max allocated"
    else:
        peak = peak_rss_gb()
        memory_kind = "peak RSS"
    return {
        "row": row.name,
        "retrieval_s": t_ret[0],
        "predict_s": t_pred[0],
        "retrieval_s_p20_p80": t_ret[1:],
        "predict_s_p20_p80": t_pred[1:],
        "gflops": (flops_backbone + flops_filter + flops_retrieval) / 1e9,
        "gflops_backbone": flops_backbone / 1e9,
        "gflops_filter": flops_filter / 1e9,
        "gflops_retrieval": flops_retrieval / 1e9,
        "memory_gb": peak,
        "memory_kind": memory_kind,
        "db_tokens": db.n_tokens,
        "db_gb": db.tokens.numel() * db.tokens.element_size() / 2**30,
    }


def run_efficiency(scale_name: str, device: str, rounds: int, rows=ROWS) -> dict[str, dict]:
    scale = SCALES[scale_name]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for capacity, templates in (("multi", scale.templates), ("4-shot", 4)):
            t0 = time.perf_counter()
            db = random_database(scale, min(templates, scale.templates), device)
            paths[capacity] = os.path.join(tmp, f"{capacity}.safetensors")
            db.save(paths[capacity])
            print(f"random database {capacity}: {db} built in {time.perf_counter() - t0:.1f} s", flush=True)
            del db
        paths["single"] = paths["multi"]  # single-class setting = the class given: same lists
        for row in rows:
            job = json.dumps(
                {"row": asdict(row), "scale": scale_name, "db": paths[row.capacity], "device": device, "rounds": rounds}
            )
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.table4", "--worker", job],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                msg = f"efficiency worker for {row.name} failed:\n{proc.stderr[-3000:]}"
                raise RuntimeError(msg)
            out[row.name] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = out[row.name]
            print(
                f"  {row.name:<34} predict {r['predict_s'] * 1e3:8.1f} ms  retrieval {r['retrieval_s'] * 1e3:8.2f} ms",
                flush=True,
            )
    return out


# ----------------------------------------------------------------------------- accuracy


def run_accuracy(
    data: str | None,
    backbone_name: str,
    weights: str | None,
    image_size: int,
    filter_path: str | None,
    device: str,
    nprobe: int,
) -> dict[str, dict]:
    """I-/P-AUROC and recall@K of every row on real backbone features of ``data``."""
    from raid_fast.app.pipelines import dataset_metrics, encode, load_filter, predict_dataset
    from raid_fast.data import load_datasets, make_embedded_dataset, select_templates

    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = str(make_embedded_dataset(Path(tmp) / "embedded", image_size=image_size))
        backbone = rf.load_backbone(backbone_name, weights=weights, image_size=image_size, device=device)
        train = load_datasets([data], split="train", image_size=image_size)
        test = load_datasets([data], split="test", image_size=image_size)
        dbs = {}
        for capacity, shots in (("multi", None), ("4-shot", 4)):
            chosen = select_templates(train, shots, seed=0)
            idx = sorted(i for ids in chosen.values() for i in ids)
            tokens, cls, _ = encode(backbone, train, idx, progress=False)
            labels = torch.as_tensor(train.class_ids[idx])
            dbs[capacity] = rf.TokenDatabase.build(tokens.to(device), cls.to(device), labels=labels, n_semantic=50)
        dbs["single"] = dbs["multi"]  # the class given: its lists are the single-class database
        filter = load_filter(filter_path, device)[0] if filter_path is not None else None
        test_tokens, test_cls, _ = encode(backbone, test, list(range(len(test))), progress=False)
        test_tokens, test_cls = test_tokens.to(device), test_cls.to(device)
        # the database's class of each test image (labels are the dataset's class indices)
        true_class = torch.as_tensor(test.class_ids).to(device)
        out = {}
        for row in ROWS:
            db = dbs[row.capacity]
            use_filter = row.use_filter and filter is not None
            k = filter.k if use_filter else row.k
            det = rf.Detector(
                backbone, db, filter=filter if use_filter else None, k=k, nprobe=nprobe, mode=row.retrieval
            )
            class_ids = true_class if row.capacity == "single" else None
            metrics = dataset_metrics(test, *predict_dataset(det, test, progress=False, class_ids=class_ids))["mean"]
            res = rf.retrieve(
                test_tokens, db, query_cls=test_cls, class_ids=class_ids, k=k, nprobe=nprobe, mode=row.retrieval
            )
            exact = rf.retrieve(test_tokens, db, class_ids=true_class, k=k, mode="flat")
            out[row.name] = {
                "i_auroc": metrics["I-AUROC"],
                "p_auroc": metrics["P-AUROC"],
                "recall": _bench.recall(res.idx, exact.idx),
                "scored_with": "filter" if use_filter else "retrieval only",
            }
            print(
                f"  {row.name:<34} I-AUROC {100 * out[row.name]['i_auroc']:5.1f}  P-AUROC {100 * out[row.name]['p_auroc']:5.1f}",
                flush=True,
            )
    return out


# ----------------------------------------------------------------------------- report


def format_table(eff: dict[str, dict], acc: dict[str, dict], device: str) -> str:
    """Markdown table: ours and the paper's figure side by side, with ours / paper."""
    head = (
        "| row | GFLOPs model (paper) | GFLOPs retrieval | memory GB (paper) | retrieval s/img "
        "| predict s/img (paper, ours/paper) | recall@K | I-AUROC (paper) | P-AUROC (paper) | scored with |"
    )
    lines = [head, "|" + "---|" * 10]
    for row in ROWS:
        e, a = eff.get(row.name), acc.get(row.name)
        paper = PAPER[row.name]
        cells = [row.name]
        if e is not None:
            cells += [
                f"{e['gflops_backbone'] + e['gflops_filter']:.2f} ({paper[0]})",
                f"{e['gflops_retrieval']:.2f}",
                f"{e['memory_gb']:.2f} ({paper[1]})",
                f"{e['retrieval_s']:.4f}",
                f"{e['predict_s']:.4f} ({paper[2]}, {e['predict_s'] / paper[2]:.2f}x)",
            ]
        else:
            cells += ["-"] * 5
        if a is not None:
            cells += [
                f"{a['recall']:.3f}",
                f"{100 * a['i_auroc']:.1f} ({paper[3]})",
                f"{100 * a['p_auroc']:.1f} ({paper[4]})",
                a["scored_with"],
            ]
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(eff: dict, acc: dict, info: dict, out_dir: str, device: str) -> list[Path]:
    rows = []
    for row in ROWS:
        cfg = {**info, **eff.get(row.name, {}), **acc.get(row.name, {})}
        if row.name in eff:
            e = eff[row.name]
            for metric, key in (("time_per_image", "predict_s"), ("retrieval_time_per_image", "retrieval_s")):
                p20, p80 = e[f"{key}_p20_p80"]
                rows.append(
                    _bench.row("table4", row.name, metric, "s", "scale", info["scale"], (e[key], p20, p80), cfg, device)
                )
        if row.name in acc:
            a = acc[row.name]
            rows.append(
                _bench.row("table4", row.name, "p_auroc", "1", "data", info["data"], (a["p_auroc"],) * 3, cfg, device)
            )
    paths = [_bench.write_rows(rows, out_dir, device)]
    md = Path(out_dir) / f"table4_{_bench.slug(_bench.device_name(device))}.md"
    v = _bench.versions()
    stamp = f"torch {v['torch']}, triton {v['triton']}, python {v['python']}, commit {_bench.git_commit()}, {rows[0]['timestamp'] if rows else ''}"
    md.write_text(f"{info['title']}\n\n{stamp}\n\n{format_table(eff, acc, device)}\n")
    paths.append(md)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--scale", choices=sorted(SCALES), default=None, help="default: mvtec448 on a GPU, mvtec256 on a CPU"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", default=None, help="MVTec-layout root for accuracy (default: the embedded dataset)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone for the accuracy part")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--image-size", type=int, default=256, help="image size of the accuracy part")
    parser.add_argument("--filter", default=None, help="trained filter checkpoint for the accuracy part")
    parser.add_argument("--nprobe", type=int, default=5)
    parser.add_argument("--skip", choices=["efficiency", "accuracy"], default=None)
    parser.add_argument("--out", default=None, help="results folder (CSV rows + a markdown table)")
    args = parser.parse_args(argv)
    if args.worker is not None:
        job = json.loads(args.worker)
        res = measure_efficiency(Row(**job["row"]), SCALES[job["scale"]], job["db"], job["device"], job["rounds"])
        print(json.dumps(res))
        return 0
    scale = args.scale or ("mvtec448" if args.device.startswith("cuda") else "mvtec256")
    eff, acc = {}, {}
    if args.skip != "efficiency":
        print(f"efficiency: {scale}, random unit tokens, DINOv2 ViT-S/14 + filter (random init), {args.device}")
        eff = run_efficiency(scale, args.device, args.rounds)
    if args.skip != "accuracy":
        print(f"accuracy: {args.data or 'embedded dataset'}, {args.backbone} @ {args.image_size}")
        acc = run_accuracy(
            args.data, args.backbone, args.weights, args.image_size, args.filter, args.device, args.nprobe
        )
    info = {
        "scale": scale,
        "data": args.data or "embedded",
        "backbone_accuracy": args.backbone,
        "image_size_accuracy": args.image_size,
        # the checkpoint's folder and name only: results files carry no machine paths
        "filter": None if args.filter is None else "/".join(Path(args.filter).parts[-3:]),
        "title": (
            f"Table 4 on {_bench.device_name(args.device)}: efficiency at {scale} (random data), "
            f"accuracy on {args.data or 'the embedded dataset'} ({args.backbone} @ {args.image_size})"
        ),
    }
    table = format_table(eff, acc, args.device)
    print()
    print(info["title"])
    print(table)
    if args.out is not None:
        for path in write_results(eff, acc, info, args.out, args.device):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
