"""Shared by the accuracy benchmarks (``vs_patchcore``, ``ablation``): the dataset, a database, a
trained filter, predictions with their metrics and time, and the result files.

Letters: N test images, H x W image size, h x w token grid.
Every run uses the demo's settings unless told otherwise: 256 px, seed 0, 50 semantic prototypes,
K = 150, nprobe = 5, 20 epochs of training at batch 8 with 15 % of the training images held out.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks import _bench
from raid_fast.detect.metrics import IMAGE_METRICS, PIXEL_METRICS

METRICS = IMAGE_METRICS + PIXEL_METRICS
DEMO = {"image_size": 256, "seed": 0, "n_semantic": 50, "k": 150, "nprobe": 5, "epochs": 20, "batch_size": 8}


def dataset_root(data: str | None, image_size: int, workdir: Path, **counts: int) -> Path:
    """``data``, or the embedded dataset generated at ``image_size`` (seed 0) under ``workdir``
    (``counts``: the generator's image counts, e.g. ``n_test_good``; its defaults otherwise)."""
    if data is not None:
        return Path(data)
    from raid_fast.data import make_embedded_dataset

    return make_embedded_dataset(workdir / "embedded", seed=DEMO["seed"], image_size=image_size, **counts)


def test_split(root: Path, image_size: int):
    from raid_fast.data import load_datasets

    return load_datasets([root], split="test", image_size=image_size)


def build(root: Path, path: Path, image_size: int, **options) -> Path:
    """The database of ``root``'s train split at ``path`` (``options``: the backbone's token options)."""
    from raid_fast.app.pipelines import build_database

    build_database(
        [root], path, image_size=image_size, n_semantic=DEMO["n_semantic"], seed=DEMO["seed"], progress=False, **options
    )
    return path


def train(root: Path, db_path: Path, out_dir: Path, epochs: int, k: int = DEMO["k"], filter=None) -> tuple[Path, float]:  # noqa: A002
    """Trains a filter as the demo does (``filter``: a custom module, default the paper's
    ``GuidedMoEFilter``); returns ``(best checkpoint, or last.pt without a held-out improvement; seconds)``."""
    from raid_fast.app.pipelines import recorded_backbone, training_set
    from raid_fast.database import TokenDatabase
    from raid_fast.detect.training import TrainConfig
    from raid_fast.detect.training import train as train_loop

    config = TrainConfig(
        epochs=epochs,
        batch_size=DEMO["batch_size"],
        k=k,
        nprobe=DEMO["nprobe"],
        seed=DEMO["seed"],
        val_fraction=0.15,
        out_dir=str(out_dir),
        log_every=10**9,
    )
    t0 = time.perf_counter()
    db = TokenDatabase.load(db_path)
    params = db.params  # written by build(): backbone, weights, image size, token options
    backbone = recorded_backbone(params)
    images, image_ids, class_ids = training_set([root], db, backbone, progress=False)
    config.image_size = params["image_size"]
    _, history = train_loop(
        config, backbone, db, images, image_ids, class_ids, filter=filter, progress=False, overwrite=True
    )
    best = out_dir / ("best.pt" if history["best_epoch"] is not None else "last.pt")
    return best, time.perf_counter() - t0


@dataclass
class Predictions:
    """A detector's output on a test split: scores [N], pixel maps [N, H, W], masks [N, H, W],
    score maps [N, h, w], database classes [N] and the wall time of the predict calls per image."""

    scores: torch.Tensor
    maps: torch.Tensor
    masks: torch.Tensor
    score_maps: torch.Tensor
    class_ids: torch.Tensor
    seconds_per_image: float
    extra: dict = field(default_factory=dict)


def predict(det, test, batch_size: int = DEMO["batch_size"], class_ids: torch.Tensor | None = None) -> Predictions:
    """``det`` on every test image; ``class_ids`` [N] fixes each image's database class (with flat
    retrieval: the exact search within that class, what hierarchical retrieval approximates). One
    untimed call first, so that one-time costs (backend choice, allocations) stay out of the time."""
    scores, maps, masks, score_maps, classes = [], [], [], [], []
    first = torch.stack([test[0]["image"]])
    det.predict(first, class_ids=None if class_ids is None else class_ids[:1])
    seconds = 0.0
    for start in range(0, len(test), batch_size):
        stop = min(start + batch_size, len(test))
        items = [test[i] for i in range(start, stop)]
        images = torch.stack([it["image"] for it in items])
        t0 = time.perf_counter()
        out = det.predict(images, class_ids=None if class_ids is None else class_ids[start:stop])
        seconds += time.perf_counter() - t0
        scores.append(out.score.cpu())
        maps.append(out.pixel_map.cpu())
        score_maps.append(out.score_map.cpu())
        classes.append(out.class_ids.cpu())
        masks.append(torch.stack([it["mask"][0] for it in items]))
    return Predictions(
        torch.cat(scores),
        torch.cat(maps),
        torch.cat(masks),
        torch.cat(score_maps),
        torch.cat(classes),
        seconds / len(test),
    )


def metrics(test, scores: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per-class metrics and their ``"mean"`` (fractions)."""
    from raid_fast.detect.metrics import evaluate_per_class

    classes = [test.classes[c] for c in np.asarray(test.class_ids)]
    return evaluate_per_class(scores, torch.as_tensor(np.asarray(test.labels)), classes, maps, masks)


def stamp() -> str:
    """Date, machine and versions, for the head of a results file."""
    v = _bench.versions()
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return f"{now}, {_bench.device_name('cpu')}, torch {v['torch']}, python {v['python']}, commit {_bench.git_commit()}"


def pct(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> Path:
    """Rows of dicts as CSV (the union of their keys as columns, in first-seen order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def results_stem(name: str) -> str:
    """``<name>_<machine slug>``, the file name of a benchmark's results on this machine."""
    return f"{name}_{_bench.slug(_bench.device_name('cpu'))}"


def relative(path: str | os.PathLike | None) -> str | None:
    """The last parts of a user path for a results file (no machine paths in committed files)."""
    return None if path is None else "/".join(Path(path).parts[-2:])
