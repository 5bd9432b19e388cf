"""``raid-fast demo``: the whole RAID pipeline on the embedded dataset, in minutes on a CPU.

Steps: generate the embedded dataset (scikit-image textures with synthetic defects and exact masks)
-> build the token database from its ``train/good`` images -> evaluate retrieval only (the paper's
ID0) -> train the guided MoE filter briefly -> evaluate again with the best held-out checkpoint ->
one table of all metrics for both settings, a JSON file of everything, and PNG panels comparing the
two anomaly maps on a few test images.

Example:
    >>> report = run_demo("raid_fast_demo", epochs=20)
    >>> report["metrics"]["+ MoE filter"]["mean"]["P-AUROC"]
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from raid_fast import _checks, _fileio
from raid_fast.app.pipelines import (
    build_database,
    dataset_metrics,
    detector_from_database,
    predict_dataset,
    train_filter,
)
from raid_fast.data import load_datasets, make_embedded_dataset
from raid_fast.detect.training import TrainConfig

logger = logging.getLogger("raid_fast")

RETRIEVAL_ONLY = "retrieval only"
WITH_FILTER = "+ MoE filter"


MARKER = ".raid_fast_demo"  # written into the folder a demo owns


def claim_folder(out_dir: os.PathLike) -> Path:
    """Makes ``out_dir`` the demo's folder, or refuses: it must be new, empty, or one an earlier demo
    claimed (it holds :data:`MARKER`), since a demo replaces what it wrote there before."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        msg = f"--out must be a folder, got the file {str(out)!r}"
        raise NotADirectoryError(msg)
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        msg = (
            f"--out {str(out)!r} holds files the demo did not write; the demo replaces its own outputs, so "
            "give it a new or empty folder"
        )
        raise FileExistsError(msg)
    _fileio.check_output_folder(out, "--out")
    (out / MARKER).write_text(json.dumps({"written_by": "raid-fast demo"}))
    return out


def _pick_examples(dataset, per_class: int) -> list[int]:
    """Test indices to draw: per class, the first image of ``per_class - 1`` defect types (rotated by
    class, so that classes show different kinds), then the first normal image."""
    picks = []
    for c in range(len(dataset.classes)):
        idx = [i for i in range(len(dataset)) if int(dataset.class_ids[i]) == c]
        kinds = sorted({dataset.samples[i].defect_type for i in idx} - {"good"})
        kinds = kinds[c % len(kinds) :] + kinds[: c % len(kinds)] if kinds else []
        bad = [next(i for i in idx if dataset.samples[i].defect_type == kind) for kind in kinds]
        good = [i for i in idx if dataset.samples[i].defect_type == "good"][:1]
        picks.extend((bad[: max(per_class - 1, 1)] + good)[:per_class])
    return picks


def run_demo(
    out_dir: os.PathLike = "raid_fast_demo",
    epochs: int = 20,
    image_size: int = 256,
    k: int = 150,
    nprobe: int = 5,
    n_semantic: int = 50,
    batch_size: int = 8,
    seed: int = 0,
    device: str = "cpu",
    examples_per_class: int = 3,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict:
    """Runs the demo and returns its report (metrics per setting and class, timings, files).

    Args:
        out_dir: folder for everything the demo writes: ``data/`` (the generated dataset),
            ``db.safetensors``, ``run/`` (filter checkpoints), ``overlays/`` (PNG panels),
            ``overview.png`` (one panel per class) and ``report.json``.
        epochs: training epochs of the filter.
        image_size: square input size (256 gives a 16 x 16 token grid with efficientnet_lite0).
        k: neighbours per token (the filter's cost-volume depth).
        nprobe: semantic prototypes probed per token.
        n_semantic: semantic prototypes per class.
        batch_size: training and evaluation batch size.
        seed: seeds the dataset, the clustering and the training.
        device: ``"cpu"`` or a CUDA device.
        examples_per_class: test images per class drawn as PNG panels.
        progress: progress bars.
        echo: where the step lines and the final table go.
    """
    from raid_fast.app.figures import comparison_row, write_png
    from raid_fast.app.reports import format_comparison

    epochs = _checks.check_int("epochs", epochs, 1)
    examples_per_class = _checks.check_int("examples_per_class", examples_per_class, 1)
    out = claim_folder(out_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def step(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        echo(f"[{time.perf_counter() - start:6.1f} s] {name} done in {timings[name]:.1f} s")

    t0 = time.perf_counter()
    root = make_embedded_dataset(out / "data", seed=seed, image_size=image_size)
    step("dataset", t0)

    t0 = time.perf_counter()
    db_path = out / "db.safetensors"
    db = build_database(
        [root], db_path, image_size=image_size, n_semantic=n_semantic, seed=seed, device=device, progress=progress
    )
    echo(f"database: {db}")
    step("database", t0)

    test = load_datasets([root], split="test", image_size=image_size)
    t0 = time.perf_counter()
    det, _ = detector_from_database(db_path, device, k=k, nprobe=nprobe)
    plain = predict_dataset(det, test, batch_size, progress, desc=RETRIEVAL_ONLY)  # scores, maps, masks
    metrics = {RETRIEVAL_ONLY: dataset_metrics(test, *plain)}
    step("evaluate retrieval only", t0)

    t0 = time.perf_counter()
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        k=k,
        nprobe=nprobe,
        seed=seed,
        val_fraction=0.15,
        out_dir=str(out / "run"),
        log_every=10**9,
    )
    # the run folder is the demo's own (claim_folder): a rerun replaces its checkpoints
    _, history = train_filter([root], db_path, config, progress=progress, device=device, overwrite=True)
    best = out / "run" / ("best.pt" if history["best_epoch"] is not None else "last.pt")
    echo(
        f"trained {epochs} epochs ({history['epochs'][-1]['step']} steps); final train loss "
        f"{history['epochs'][-1]['train_loss']:.4f}; using {best.name} (epoch {history['best_epoch'] or epochs})"
    )
    step("train filter", t0)

    t0 = time.perf_counter()
    det, _ = detector_from_database(db_path, device, best)
    filtered = predict_dataset(det, test, batch_size, progress, desc=WITH_FILTER)
    metrics[WITH_FILTER] = dataset_metrics(test, *filtered)
    step("evaluate with filter", t0)

    t0 = time.perf_counter()
    maps = {RETRIEVAL_ONLY: plain[1], WITH_FILTER: filtered[1]}
    scores = {RETRIEVAL_ONLY: plain[0], WITH_FILTER: filtered[0]}
    # one colour range per setting over the whole test set, so that panels compare across images
    ranges = {name: (float(m.min()), float(np.quantile(m.numpy(), 0.999))) for name, m in maps.items()}
    files, overview = [], []
    for i in _pick_examples(test, examples_per_class):
        item = test[i]
        row = comparison_row(
            item["image"],
            item["mask"][0],
            {name: m[i] for name, m in maps.items()},
            ranges,
            {name: float(s[i]) for name, s in scores.items()},
        )
        sample = test.samples[i]
        files.append(
            str(
                write_png(
                    row, out / "overlays" / f"{sample.class_name}_{sample.defect_type}_{Path(sample.path).stem}.png"
                )
            )
        )
        if (
            sample.defect_type != "good"
            and len(overview) < len(test.classes)
            and not any(c == sample.class_name for c, _ in overview)
        ):
            overview.append((sample.class_name, row))
    overview_path = write_png(np.concatenate([r for _, r in overview], axis=0), out / "overview.png")
    step("overlays", t0)

    table = format_comparison(metrics)
    total = time.perf_counter() - start
    report = {
        "metrics": metrics,
        "timings_s": {**timings, "total": total},
        "history": history["epochs"],
        "best_epoch": history["best_epoch"],
        "settings": {
            "image_size": image_size,
            "k": k,
            "nprobe": nprobe,
            "n_semantic": n_semantic,
            "epochs": epochs,
            "batch_size": batch_size,
            "seed": seed,
            "device": device,
            "threads": torch.get_num_threads(),
        },
        "files": {"overlays": files, "overview": str(overview_path), "checkpoint": str(best), "database": str(db_path)},
    }
    _fileio.atomic_write(out / "report.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)), fsync=False)
    echo("")
    echo(table)
    echo(f"\ntotal {total:.1f} s; panels in {out / 'overlays'}, overview {overview_path}, report {out / 'report.json'}")
    return report


__all__ = ["run_demo"]
