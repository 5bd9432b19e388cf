"""anomalib's PatchCore against raid_fast on the same backbone and the same images.

Rows, on the embedded dataset (default) or any MVTec-layout ``--data`` folder, at one image size:

- **anomalib PatchCore** (anomalib's own ``PatchcoreModel``, optional dependency): one model per
  class (the MVTec protocol), timm ``tf_efficientnet_lite0`` with the ImageNet weights raid_fast
  ships (loaded offline into anomalib's feature extractor), layers ``blocks.2`` + ``blocks.4``
  (anomalib's choice for this backbone; raid_fast's default tokens add ``blocks.1``, all on a
  stride-8 grid without aggregation: see ``benchmarks/ablation.py``), its 3 x 3 local aggregation, k-center-greedy coreset
  (``--coreset-ratio``, anomalib's default 0.1), its L2 1-NN search, its image score (the
  9-neighbour re-weighted maximum) and its map (nearest upsampling, Gaussian blur sigma 4).
  Images are preprocessed by raid_fast's backbone (resize, (x - 0.5) / 0.5), so both methods see
  identical inputs.
- **raid_fast retrieval only**, hierarchical, and flat exact within the class the hierarchical row
  routed each image to (what hierarchical retrieval approximates, and PatchCore's per-class bank),
  with the default token options (one multi-class database, classes routed by CLS token).
- **raid_fast + MoE filter** (hierarchical): a filter trained here as the demo trains it (or
  ``--filter CKPT`` for one trained on a database built with the same defaults).

Per class and mean: I-AUROC, I-AP, I-F1max, P-AUROC, P-AP, P-F1max, AUPRO; predict time per image
(wall clock, batch 8) and fit time. Written as CSV + markdown under ``--out``.

anomalib is imported only here, lazily; without it the PatchCore rows are skipped with a message.
To install it without letting pip replace torch, numpy or timm, pin what is installed::

    pip freeze | grep -iE "^(torch|torchvision|numpy|timm|scipy|scikit-image|scikit-learn|pillow|safetensors)==" > c.txt
    pip install "anomalib==2.7.0" -c c.txt

(``examples/anomalib-constraints.txt`` holds the pins CI installs anomalib with, for the examples.)
anomalib's k-center-greedy allocates a large temporary per step, and glibc's dynamic mmap threshold
can then keep every one of them (the process grows by gigabytes); the script re-executes itself with
``MALLOC_MMAP_THRESHOLD_=1048576`` (read by glibc at start, so it cannot be set later) when a
coreset is requested and the variable is not set.

Usage: ``python -m benchmarks.vs_patchcore [--data ROOT] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks import _quality as q

ANOMALIB_LAYERS = ("blocks.2", "blocks.4")  # timm feature_info: stride 8 (40 ch) and stride 16 (112 ch)
ANOMALIB_INSTALL = (
    'anomalib is not installed; pip install "anomalib==2.7.0" -c examples/anomalib-constraints.txt '
    "(it keeps the installed torch; see this module's docstring)"
)
MALLOC_VAR, MALLOC_VALUE = "MALLOC_MMAP_THRESHOLD_", "1048576"

PATCHCORE = "anomalib PatchCore"
HIER = "raid_fast retrieval only (hierarchical)"
FLAT = "raid_fast retrieval only (flat exact, in the routed class)"
FILTER = "raid_fast + MoE filter (hierarchical)"


def anomalib_version() -> str | None:
    """anomalib's version, or None when it is not installed (nothing of it is imported otherwise)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("anomalib")
    except PackageNotFoundError:
        return None


def patchcore_model(num_neighbors: int = 9):
    """anomalib's ``PatchcoreModel`` on ``tf_efficientnet_lite0`` with raid_fast's packaged ImageNet
    weights (no download: ``pre_trained=False``, then the weights loaded strictly)."""
    import timm
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from raid_fast.detect.backbones import lite0_to_timm, lite0_weights_path

    model = PatchcoreModel(
        layers=list(ANOMALIB_LAYERS), backbone="tf_efficientnet_lite0", pre_trained=False, num_neighbors=num_neighbors
    )
    extractor = model.feature_extractor.feature_extractor  # timm EfficientNetFeatures, no head
    full = lite0_to_timm(
        torch.load(lite0_weights_path(), map_location="cpu", weights_only=True),
        timm.create_model("tf_efficientnet_lite0", pretrained=False),
    )
    own = extractor.state_dict()
    extractor.load_state_dict({k: v for k, v in full.items() if k in own}, strict=True)
    return model.eval()


@torch.no_grad()
def run_patchcore(root: Path, image_size: int, ratio: float, batch_size: int, seed: int) -> q.Predictions:
    """One anomalib PatchCore per class of ``root``; predictions on the whole test split, in its order."""
    from raid_fast.data import load_datasets
    from raid_fast.detect.backbones import load_backbone

    # raid_fast's preprocessing (resize, clip, (x - 0.5) / 0.5): the inputs our detector sees
    prep = load_backbone("efficientnet_lite0", image_size=image_size).preprocess
    train = load_datasets([root], split="train", image_size=image_size)
    test = q.test_split(root, image_size)
    n = len(test)
    scores = torch.zeros(n)
    maps = torch.zeros(n, image_size, image_size)
    masks = torch.stack([test[i]["mask"][0] for i in range(n)])
    fit_s = predict_s = 0.0
    for c, name in enumerate(test.classes):
        model = patchcore_model()
        tr = [i for i in range(len(train)) if train.classes[int(train.class_ids[i])] == name]
        te = [i for i in range(n) if int(test.class_ids[i]) == c]
        t0 = time.perf_counter()
        model.train()  # PatchcoreModel stores the embeddings in train mode (its extractor stays in eval)
        for s in range(0, len(tr), batch_size):
            model(prep(torch.stack([train[i]["image"] for i in tr[s : s + batch_size]])))
        torch.manual_seed(seed)  # k-center-greedy's first centre
        np.random.seed(seed)  # its sparse random projection
        if ratio < 1.0:
            model.subsample_embedding(ratio)
        else:  # no coreset: the whole bank (k-center-greedy at 1.0 would only reorder it, at O(N^2))
            model.memory_bank = torch.vstack(model.embedding_store)
            model.embedding_store.clear()
        model.eval()
        fit_s += time.perf_counter() - t0
        model(prep(torch.stack([test[te[0]]["image"]])))  # untimed first call, as for raid_fast's rows
        for s in range(0, len(te), batch_size):
            chunk = te[s : s + batch_size]
            images = prep(torch.stack([test[i]["image"] for i in chunk]))
            t0 = time.perf_counter()
            out = model(images)
            predict_s += time.perf_counter() - t0
            scores[chunk] = out.pred_score.reshape(-1).float()
            maps[chunk] = out.anomaly_map[:, 0].float()
        print(f"  PatchCore {name}: bank {tuple(model.memory_bank.shape)}", flush=True)
    truth = torch.as_tensor(np.asarray(test.class_ids))
    return q.Predictions(scores, maps, masks, torch.empty(0), truth, predict_s / n, {"fit_s": fit_s})


def run_raid(root: Path, workdir: Path, image_size: int, epochs: int, filter_path: str | None) -> dict:
    """raid_fast's three rows: ``{row name: Predictions}``."""
    from raid_fast.app.pipelines import detector_from_database

    test = q.test_split(root, image_size)
    db_path = workdir / "db.safetensors"
    t0 = time.perf_counter()
    q.build(root, db_path, image_size)
    build_s = time.perf_counter() - t0
    out = {}
    for name, mode in ((HIER, "hierarchical"), (FLAT, "flat")):
        det, _ = detector_from_database(db_path, k=1, nprobe=q.DEMO["nprobe"], mode=mode)
        # flat: the exact search within the class the hierarchical row routed each image to
        out[name] = q.predict(det, test, class_ids=out[HIER].class_ids if mode == "flat" else None)
        out[name].extra["fit_s"] = build_s
        print(f"  {name}: {out[name].seconds_per_image * 1e3:.0f} ms/img", flush=True)
    train_s = 0.0
    if filter_path is None:
        filter_path, train_s = q.train(root, db_path, workdir / "run", epochs)
    det, _ = detector_from_database(db_path, filter_path=filter_path)
    out[FILTER] = q.predict(det, test)
    out[FILTER].extra["fit_s"] = build_s + train_s
    print(f"  {FILTER}: {out[FILTER].seconds_per_image * 1e3:.0f} ms/img", flush=True)
    return out


def checks(results: dict[str, dict]) -> list[str]:
    """The issue's targets, as lines that say whether each holds (means, in points)."""
    lines = []
    if PATCHCORE not in results:
        return ["anomalib PatchCore did not run: no comparison"]
    pc, hier, filt = (results[n]["mean"] for n in (PATCHCORE, HIER, FILTER))
    for metric in ("P-AP", "P-F1max", "AUPRO", "I-AUROC"):
        d = 100 * (hier[metric] - pc[metric])
        lines.append(f"retrieval only (hierarchical) vs PatchCore, {metric}: {d:+.2f} ({'ok' if d >= 0 else 'BELOW'})")
    for metric in ("P-AUROC", "P-AP", "P-F1max", "AUPRO"):
        best = max(pc[metric], hier[metric], results[FLAT]["mean"][metric])
        d = 100 * (filt[metric] - best)
        lines.append(f"filter vs the best of the others, {metric}: {d:+.2f} ({'ok' if d > 0 else 'NOT ABOVE'})")
    return lines


def report(results: dict, preds: dict, info: dict) -> tuple[str, list[dict]]:
    """The markdown text and the CSV rows."""
    classes = [c for c in next(iter(results.values())) if c != "mean"] + ["mean"]
    header = ["class", "method", *q.METRICS, "predict ms/img", "fit s"]
    rows, csv_rows = [], []
    for c in classes:
        for name, per_class in results.items():
            p = preds[name]
            ms, fit = 1e3 * p.seconds_per_image, p.extra.get("fit_s", float("nan"))
            rows.append([c, name, *(q.pct(per_class[c][m]) for m in q.METRICS), f"{ms:.0f}", f"{fit:.0f}"])
            csv_rows.append(
                {
                    "class": c,
                    "method": name,
                    **{m: f"{per_class[c][m]:.6f}" for m in q.METRICS},
                    "predict_s_per_image": f"{p.seconds_per_image:.6f}",
                    "fit_s": f"{fit:.3f}",
                    **info,
                }
            )
    settings = ", ".join(f"{k} {v}" for k, v in info.items() if k != "stamp")
    text = "\n\n".join(
        [
            "# anomalib PatchCore vs raid_fast (same backbone, same images)",
            info["stamp"],
            settings,
            q.markdown(header, rows),
            "Targets (mean over classes, points):\n\n" + "\n".join(f"- {line}" for line in checks(results)),
        ]
    )
    return text + "\n", csv_rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="MVTec-layout root (default: the embedded dataset)")
    parser.add_argument("--image-size", type=int, default=q.DEMO["image_size"])
    parser.add_argument("--epochs", type=int, default=q.DEMO["epochs"], help="filter training epochs")
    parser.add_argument("--filter", default=None, help="a trained filter checkpoint instead of training one")
    parser.add_argument("--coreset-ratio", type=float, default=0.1, help="PatchCore's coreset (1.0: the whole bank)")
    parser.add_argument("--skip-anomalib", action="store_true", help="raid_fast rows only")
    parser.add_argument("--out", default=None, help="results folder (CSV + markdown)")
    args = parser.parse_args(argv)

    use_anomalib = not args.skip_anomalib and anomalib_version() is not None
    if not args.skip_anomalib and not use_anomalib:
        print(f"note: {ANOMALIB_INSTALL}; the PatchCore rows are skipped", file=sys.stderr)
    if use_anomalib and args.coreset_ratio < 1.0 and os.environ.get(MALLOC_VAR) is None and argv is None:
        # see the module docstring: glibc reads the variable at start only
        os.environ[MALLOC_VAR] = MALLOC_VALUE
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.vs_patchcore", *sys.argv[1:]])

    warnings.filterwarnings("ignore", category=FutureWarning)  # anomalib's imports of deprecated timm paths
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = q.dataset_root(args.data, args.image_size, work)
        test = q.test_split(root, args.image_size)
        print(f"{len(test)} test images of {test.classes} at {args.image_size} px", flush=True)
        preds = {}
        if use_anomalib:
            preds[PATCHCORE] = run_patchcore(root, args.image_size, args.coreset_ratio, q.DEMO["batch_size"], 0)
        preds.update(run_raid(root, work, args.image_size, args.epochs, args.filter))
        results = {name: q.metrics(test, p.scores, p.maps, p.masks) for name, p in preds.items()}

    info = {
        "stamp": q.stamp(),
        "data": args.data and q.relative(args.data) or "embedded (seed 0)",
        "image_size": args.image_size,
        "test_images": len(test),
        "anomalib": anomalib_version() if use_anomalib else "not run",
        "coreset_ratio": args.coreset_ratio if use_anomalib else "",
        "filter": q.relative(args.filter) or f"trained here, {args.epochs} epochs",
    }
    text, csv_rows = report(results, preds, info)
    print("\n" + text)
    if args.out is not None:
        stem = q.results_stem("vs_patchcore")
        md = Path(args.out) / f"{stem}.md"
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text)
        print(f"wrote {q.write_csv(Path(args.out) / f'{stem}.csv', csv_rows)} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
