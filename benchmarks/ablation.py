"""The paper's component ablation (its Table 6), its K and nprobe sweeps, and the token options the
defaults were chosen from, on the embedded dataset (or ``--data``).

Parts (``--parts``, all by default):

- ``features``: retrieval only (1-NN cost, hierarchical, K = 1) for every token option of
  ``efficientnet_lite0``: stages blocks.2 + blocks.4 (PatchCore's) or blocks.1 + blocks.2 +
  blocks.4, stride 8 or 16, local aggregation p = 1 or 3, image score top 1 % / max / top 10, and
  the pixel map's upsampling (centre-aligned or the authors' corner-aligned); cost beside accuracy:
  tokens per image, database size and retrieval time per image (hierarchical, and flat exact
  within the routed class).
- ``components``: ID0 retrieval only (hierarchical, and flat exact within the class each image was
  routed to: the search hierarchical retrieval approximates), then filters trained as the demo
  trains them: without guidance (G0 zeroed: the filter sees the cost volume only), with guidance
  but without the stage-1 MoE (one guidance expert, E_g = 1, paper ID4's setting), without any MoE
  (one expert per stage, E_g = E_C = 1), and the full model (3 + 3 experts, paper ID7), evaluated
  with hierarchical retrieval; the full model with flat retrieval too.
- ``sweeps``: K = 1, 10, 50, 150, 250 (a filter trained per K) and nprobe = 1, 5, 20 (at test time,
  retrieval only and the full model trained at nprobe 5), flat exact as the reference.

The embedded data get 4x the demo's test images by default (``--test-good 48 --test-bad 72`` per
class, 360 in all; the training images are the demo's): on the demo's 90, one image moves I-F1max
by about a point and I-AUROC by about half of one, more than the differences the sweeps measure.

The paper's numbers (MVTec-AD, DINOv2-S, I-/P-AUROC) are printed beside ours where the paper has a
comparable row. Usage: ``python -m benchmarks.ablation [--parts ...] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import _bench
from benchmarks import _quality as q
from raid_fast.detect.filter import GuidedMoEFilter

# paper Table 6 / 7 (MVTec-AD, DINOv2-S, I-AUROC / P-AUROC) for the rows that have a counterpart
PAPER = {
    "ID0 retrieval only": (97.9, 97.5),
    "filter, no guidance": None,
    "filter, guidance without MoE_g (E_g = 1)": (99.1, 98.1),
    "filter, no MoE (E_g = E_C = 1)": None,
    "full model (E_g = E_C = 3)": (99.4, 98.6),  # FULL
}
# (stride, aggregate, layers): PatchCore's stages (blocks.2 + blocks.4) and with blocks.1 added
FEATURE_GRID = [(s, p, layers) for layers in ((2, 4), (1, 2, 4)) for s in (16, 8) for p in (1, 3)]
SCORES = ("top1%", "max", "top10")
K_SWEEP = (1, 10, 50, 150, 250)
NPROBE_SWEEP = (1, 5, 20)


class UnguidedFilter(GuidedMoEFilter):
    """The filter without guidance: G0 is replaced by zeros, so the experts see the cost volume only
    (the guidance branch reduces to learned constants). Same weights layout as the full filter."""

    def forward(self, guidance, cost, **kwargs):
        return super().forward(torch.zeros_like(guidance), cost, **kwargs)


FULL = "full model (E_g = E_C = 3)"
VARIANTS = {
    "filter, no guidance": (UnguidedFilter, {}),
    "filter, guidance without MoE_g (E_g = 1)": (GuidedMoEFilter, {"n_guidance_experts": 1, "guidance_top_k": 1}),
    "filter, no MoE (E_g = E_C = 1)": (
        GuidedMoEFilter,
        {"n_guidance_experts": 1, "guidance_top_k": 1, "n_denoise_experts": 1},
    ),
    FULL: (GuidedMoEFilter, {}),
}


def metric_row(part: str, name: str, m: dict, extra: dict) -> dict:
    return {"part": part, "row": name, **{k: f"{m[k]:.6f}" for k in q.METRICS}, **extra}


def time_retrieval(db, tokens: torch.Tensor, cls: torch.Tensor, grid, k: int, nprobe: int, mode: str) -> float:
    """Median seconds per image of ``retrieve`` + cost volume of test tokens [B, L, D]: hierarchical
    routed by the CLS tokens [B, D], flat exact within the class they route to."""
    import raid_fast as rf

    class_ids = db.classify(cls) if mode == "flat" else None

    def run():
        res = rf.retrieve(tokens, db, query_cls=cls, class_ids=class_ids, k=k, nprobe=nprobe, mode=mode, grid=grid)
        res.cost_volume(*grid)

    return _bench.time_fn(run, rounds=3)[0] / tokens.shape[0]


def part_features(root: Path, work: Path, image_size: int, test) -> list[dict]:
    from raid_fast.app.pipelines import detector_from_database, encode
    from raid_fast.detect.anomaly_map import AnomalyMapGenerator, image_score

    rows = []
    for stride, p, layers in FEATURE_GRID:
        tag = f"s{stride} p{p} L{''.join(map(str, layers))}"
        path = work / f"{tag.replace(' ', '_')}.safetensors"
        db_path = q.build(root, path, image_size, stride=stride, aggregate=p, layers=layers)
        det, db = detector_from_database(db_path, k=1)
        pred = q.predict(det, test)
        tokens, cls, grid = encode(det.backbone, test, list(range(min(8, len(test)))), progress=False)
        hier = time_retrieval(db, tokens, cls, grid, 1, q.DEMO["nprobe"], "hierarchical")
        flat = time_retrieval(db, tokens, cls, grid, 1, 1, "flat")
        options = {"layers": list(layers), "stride": stride, "aggregate": p}
        cost = {
            "tokens_per_image": tokens.shape[1],
            "db_tokens": db.n_tokens,
            "retrieval_ms_per_image_hier": f"{1e3 * hier:.2f}",
            "retrieval_ms_per_image_flat": f"{1e3 * flat:.2f}",
            "predict_ms_per_image": f"{1e3 * pred.seconds_per_image:.0f}",
        }
        for spec in SCORES:
            m = q.metrics(test, image_score(pred.score_maps, spec), pred.maps, pred.masks)["mean"]
            extra = {**options, "image_score": spec, "align_corners": False, **cost}
            rows.append(metric_row("features", f"{tag} {spec}", m, extra))
            print(f"  features {tag} {spec}: P-AP {q.pct(m['P-AP'])} I-AUROC {q.pct(m['I-AUROC'])}", flush=True)
        corner = AnomalyMapGenerator(align_corners=True)(pred.score_maps, (image_size, image_size))
        m = q.metrics(test, pred.scores, corner, pred.masks)["mean"]
        extra = {**options, "image_score": "top1%", "align_corners": True, **cost}
        rows.append(metric_row("features", f"{tag} top1% corner-aligned map", m, extra))
    return rows


def _evaluate(
    db_path: Path, test, ckpt: Path | None = None, cls=GuidedMoEFilter, class_ids=None, **detector
) -> q.Predictions:
    """Predictions of the database's detector (``detector``: k, nprobe, mode), with the filter of
    ``ckpt`` (built as ``cls``, with the checkpoint's dimensions) or retrieval only; ``class_ids``
    [N] fixes the images' classes (flat mode: the exact search within them)."""
    from raid_fast.app.pipelines import detector_from_database
    from raid_fast.detect.checkpoints import load_checkpoint, read_checkpoint
    from raid_fast.detect.detector import Detector

    det, db = detector_from_database(db_path, **detector)
    if ckpt is not None:
        filter, _ = load_checkpoint(ckpt, filter=cls(**read_checkpoint(ckpt)["filter_args"]))  # noqa: A001
        det = Detector(
            det.backbone,
            db,
            filter=filter.eval(),
            k=filter.k,
            nprobe=det.nprobe,
            mode=det.mode,
            image_score=det.image_score.spec,
        )
    return q.predict(det, test, class_ids=class_ids)


def part_components(root: Path, work: Path, db_path: Path, test, epochs: int, ckpts: dict) -> list[dict]:
    """ID0 and the four trained variants; ``ckpts`` receives each variant's checkpoint by name."""
    from raid_fast.database import TokenDatabase

    dim = TokenDatabase.load(db_path).dim
    rows = []
    routed = None  # the hierarchical row's classes, for the flat rows: exact search within them
    for mode in ("hierarchical", "flat"):
        pred = _evaluate(db_path, test, class_ids=routed, k=1, mode=mode)
        routed = pred.class_ids
        m = q.metrics(test, pred.scores, pred.maps, pred.masks)["mean"]
        rows.append(metric_row("components", "ID0 retrieval only", m, _extra(mode, pred, "ID0 retrieval only")))
    for i, (name, (cls, args)) in enumerate(VARIANTS.items()):
        ckpt, train_s = q.train(root, db_path, work / f"run_{i}", epochs, filter=cls(dim=dim, k=q.DEMO["k"], **args))
        ckpts[name] = ckpt
        for mode in ("hierarchical", "flat") if name == FULL else ("hierarchical",):
            pred = _evaluate(db_path, test, ckpt, cls, routed if mode == "flat" else None, mode=mode)
            m = q.metrics(test, pred.scores, pred.maps, pred.masks)["mean"]
            rows.append(metric_row("components", name, m, {**_extra(mode, pred, name), "train_s": f"{train_s:.0f}"}))
            print(f"  {name} ({mode}): P-AP {q.pct(m['P-AP'])} I-AUROC {q.pct(m['I-AUROC'])}", flush=True)
    return rows


def _extra(mode: str, pred: q.Predictions, name: str) -> dict:
    paper = PAPER.get(name)
    return {
        "retrieval": mode,
        "predict_ms_per_image": f"{1e3 * pred.seconds_per_image:.0f}",
        "paper_i_auroc": "" if paper is None else paper[0],
        "paper_p_auroc": "" if paper is None else paper[1],
    }


def part_sweeps(
    root: Path,
    work: Path,
    db_path: Path,
    test,
    epochs: int,
    ckpts: dict,
    k_sweep=K_SWEEP,
    nprobe_sweep=NPROBE_SWEEP,
) -> list[dict]:
    """The K sweep (a full model trained per K; K = 150 is the components part's when it ran) and the
    test-time nprobe sweep."""
    rows = []
    for k in k_sweep:
        train_s = ""
        if k == q.DEMO["k"] and FULL in ckpts:
            ckpt = ckpts[FULL]
        else:
            ckpt, seconds = q.train(root, db_path, work / f"run_k{k}", epochs, k=k)
            train_s = f"{seconds:.0f}"
        if k == q.DEMO["k"]:
            ckpts[FULL] = ckpt
        pred = _evaluate(db_path, test, ckpt)
        m = q.metrics(test, pred.scores, pred.maps, pred.masks)["mean"]
        rows.append(
            metric_row("K", f"full model, K = {k}", m, {"k": k, "nprobe": q.DEMO["nprobe"], "train_s": train_s})
        )
        print(f"  K = {k}: P-AP {q.pct(m['P-AP'])} I-AUROC {q.pct(m['I-AUROC'])}", flush=True)
    for name, filt in (("retrieval only", None), ("full model", ckpts.get(FULL))):
        if name == "full model" and filt is None:
            continue  # K = 150 was not in the sweep and the components did not run
        k = 1 if filt is None else q.DEMO["k"]
        routed = None
        for nprobe in (*nprobe_sweep, None):
            mode = "flat" if nprobe is None else "hierarchical"
            class_ids = routed if nprobe is None else None
            pred = _evaluate(db_path, test, filt, class_ids=class_ids, k=k, nprobe=nprobe or 1, mode=mode)
            routed = pred.class_ids
            m = q.metrics(test, pred.scores, pred.maps, pred.masks)["mean"]
            label = f"{name}, nprobe = {nprobe}" if nprobe is not None else f"{name}, flat exact (routed class)"
            extra = {"k": k, "nprobe": nprobe or "all", "predict_ms_per_image": f"{1e3 * pred.seconds_per_image:.0f}"}
            rows.append(metric_row("nprobe", label, m, extra))
            print(f"  {label}: P-AP {q.pct(m['P-AP'])} I-AUROC {q.pct(m['I-AUROC'])}", flush=True)
    return rows


def tables(rows: list[dict]) -> str:
    """The markdown tables of the parts that ran (metrics in percent)."""
    out = []
    feats = [r for r in rows if r["part"] == "features"]
    if feats:
        head = [
            "layers",
            "stride",
            "p",
            "image score",
            "map",
            *q.METRICS,
            "tokens/img",
            "DB tokens",
            "retrieval ms/img (hier / flat)",
        ]
        body = [
            [
                "+".join(f"blocks.{i}" for i in r["layers"]),
                r["stride"],
                r["aggregate"],
                r["image_score"],
                "corner-aligned" if r["align_corners"] else "centred",
                *(q.pct(float(r[m])) for m in q.METRICS),
                r["tokens_per_image"],
                r["db_tokens"],
                f"{r['retrieval_ms_per_image_hier']} / {r['retrieval_ms_per_image_flat']}",
            ]
            for r in feats
        ]
        out.append("## Token options (retrieval only, hierarchical, 1-NN)\n\n" + q.markdown(head, body))
    comps = [r for r in rows if r["part"] == "components"]
    if comps:
        head = ["row", "retrieval", *q.METRICS, "paper I-/P-AUROC", "predict ms/img", "train s"]
        body = [
            [
                r["row"],
                r["retrieval"],
                *(q.pct(float(r[m])) for m in q.METRICS),
                f"{r['paper_i_auroc']} / {r['paper_p_auroc']}" if r["paper_i_auroc"] != "" else "-",
                r["predict_ms_per_image"],
                r.get("train_s", ""),
            ]
            for r in comps
        ]
        out.append("## Components (paper Table 6)\n\n" + q.markdown(head, body))
    for part, title in (("K", "K sweep (full model, hierarchical, nprobe 5)"), ("nprobe", "nprobe sweep (test time)")):
        sel = [r for r in rows if r["part"] == part]
        if sel:
            head = ["row", *q.METRICS]
            out.append(
                f"## {title}\n\n"
                + q.markdown(head, [[r["row"], *(q.pct(float(r[m])) for m in q.METRICS)] for r in sel])
            )
    return "\n\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["features", "components", "sweeps"], default=None)
    parser.add_argument("--data", default=None, help="MVTec-layout root (default: the embedded dataset)")
    parser.add_argument("--image-size", type=int, default=q.DEMO["image_size"])
    parser.add_argument("--epochs", type=int, default=q.DEMO["epochs"], help="training epochs of every filter")
    parser.add_argument("--k-sweep", type=int, nargs="+", default=list(K_SWEEP))
    parser.add_argument("--nprobe-sweep", type=int, nargs="+", default=list(NPROBE_SWEEP))
    parser.add_argument("--test-good", type=int, default=48, help="embedded data: normal test images per class")
    parser.add_argument("--test-bad", type=int, default=72, help="embedded data: defective test images per class")
    parser.add_argument("--out", default=None, help="results folder (CSV + markdown)")
    args = parser.parse_args(argv)
    parts = args.parts or ["features", "components", "sweeps"]
    start = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = q.dataset_root(args.data, args.image_size, work, n_test_good=args.test_good, n_test_bad=args.test_bad)
        test = q.test_split(root, args.image_size)
        if "features" in parts:
            rows += part_features(root, work, args.image_size, test)
        db_path = work / "db.safetensors"
        ckpts: dict = {}
        if "components" in parts or "sweeps" in parts:
            q.build(root, db_path, args.image_size)
        if "components" in parts:
            rows += part_components(root, work, db_path, test, args.epochs, ckpts)
        if "sweeps" in parts:
            rows += part_sweeps(root, work, db_path, test, args.epochs, ckpts, args.k_sweep, args.nprobe_sweep)
    info = {
        "data": q.relative(args.data) or "embedded (seed 0)",
        "image_size": args.image_size,
        "epochs": args.epochs,
        "test_images": len(test),
    }
    text = "\n\n".join(
        [
            "# Ablation: token options, components, K and nprobe",
            q.stamp(),
            ", ".join(f"{k} {v}" for k, v in info.items()) + f"; whole run {time.perf_counter() - start:.0f} s",
            tables(rows),
        ]
    )
    print("\n" + text)
    if args.out is not None:
        stem = q.results_stem("ablation")
        md = Path(args.out) / f"{stem}.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text + "\n")
        print(f"wrote {q.write_csv(Path(args.out) / f'{stem}.csv', [{**r, **info} for r in rows])} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
