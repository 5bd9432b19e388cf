"""The jobs behind the command line, as functions: build a database, evaluate, write overlays.

Letters: B images, H x W image size, D token dim.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from raid_fast.backbones import load_backbone
from raid_fast.database import TokenDatabase
from raid_fast.detector import Detector

logger = logging.getLogger("raid_fast")


def _batches(indices: Sequence[int], batch_size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


def encode(
    backbone, dataset, indices: Sequence[int], batch_size: int = 16, progress: bool = True, desc: str = "encode"
):
    """Backbone tokens of ``dataset[indices]``: tokens [B, L, D], cls [B, D], grid (h, w)."""
    from tqdm.auto import tqdm

    tokens, cls, grid = [], [], None
    for chunk in tqdm(list(_batches(list(indices), batch_size)), desc=desc, unit="batch", disable=not progress):
        images = torch.stack([dataset[i]["image"] for i in chunk])
        t, c, grid = backbone(images)
        tokens.append(t.cpu())
        cls.append(c.cpu())
    return torch.cat(tokens), torch.cat(cls), grid


def build_database(
    roots: Sequence[os.PathLike],
    out: os.PathLike,
    backbone: str = "efficientnet_lite0",
    weights: Optional[str] = None,
    image_size: int = 256,
    shots: Optional[int] = None,
    n_semantic: int = 50,
    label_free: bool = False,
    kmeans_iters: int = 25,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
) -> TokenDatabase:
    """Templates of the train split(s) -> backbone tokens -> ``TokenDatabase`` saved at ``out``.

    The backbone name, weights and image size are stored in the database's parameters, so that
    evaluation uses the same preprocessing chain.
    """
    from raid_fast.data import load_datasets, select_templates

    train = load_datasets(list(roots), split="train", image_size=image_size)
    chosen = select_templates(train, shots, seed=seed)
    indices = sorted(i for idx in chosen.values() for i in idx)
    bb = load_backbone(backbone, weights=weights, device=device, image_size=image_size)
    tokens, cls, _ = encode(bb, train, indices, batch_size, progress, desc="templates")
    labels = torch.as_tensor(np.asarray(train.class_ids)[indices])
    n_classes = len(train.classes)
    db = TokenDatabase.build(
        tokens.to(device),
        cls.to(device),
        labels=labels,
        n_classes=n_classes if label_free else None,
        n_semantic=n_semantic,
        kmeans_iters=kmeans_iters,
        seed=seed,
        progress=progress,
    )
    db.params.update(
        {
            "backbone": backbone,
            "weights": weights,
            "image_size": image_size,
            "class_names": list(train.classes),
            "template_paths": [str(train.samples[i].path) for i in indices],
        }
    )
    db.save(out)
    return db


def detector_from_database(db_path: os.PathLike, device: str = "cpu", filter_path: Optional[str] = None, **kwargs: Any):
    """Loads a database and the backbone it was built with (and a trained filter) into a Detector."""
    db = TokenDatabase.load(db_path, device=device)
    p = db.params
    if "backbone" not in p:
        msg = f"{db_path!r} does not record its backbone; build it with `raid-fast build-db`"
        raise ValueError(msg)
    bb = load_backbone(p["backbone"], weights=p.get("weights"), device=device, image_size=p["image_size"])
    flt = None
    if filter_path is not None:
        from raid_fast.models import GuidedMoEFilter

        ckpt = torch.load(filter_path, map_location=device, weights_only=False)
        flt = GuidedMoEFilter(**ckpt.get("model_args", {"dim": db.dim, "k": kwargs.get("k", 150)})).to(device)
        flt.load_state_dict(ckpt["model"])
        kwargs["k"] = flt.k
    return Detector(bb, db, filter=flt, **kwargs), db


def evaluate_dataset(
    detector: Detector,
    roots: Sequence[os.PathLike],
    image_size: int,
    class_names: Optional[Sequence[str]] = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Per-class metrics (and their mean) of a detector on the test split(s)."""
    from tqdm.auto import tqdm

    from raid_fast.data import load_datasets
    from raid_fast.metrics import evaluate_per_class

    test = load_datasets(list(roots), split="test", image_size=image_size)
    scores, maps, masks = [], [], []
    for chunk in tqdm(
        list(_batches(list(range(len(test))), batch_size)), desc="eval", unit="batch", disable=not progress
    ):
        items = [test[i] for i in chunk]
        out = detector.predict(torch.stack([it["image"] for it in items]))
        scores.append(out.score.cpu())
        maps.append(out.pixel_map.cpu())
        masks.append(torch.stack([it["mask"][0] for it in items]))
    classes = [test.classes[c] for c in np.asarray(test.class_ids)]
    return evaluate_per_class(
        torch.cat(scores), torch.as_tensor(np.asarray(test.labels)), classes, torch.cat(maps), torch.cat(masks)
    )


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Metrics as an aligned text table, one row per class, in percent."""
    names = list(next(iter(results.values())).keys())
    width = max(len(c) for c in results) + 2
    lines = [f"{'class':<{width}}" + "".join(f"{n:>9}" for n in names)]
    for cls, row in results.items():
        lines.append(f"{cls:<{width}}" + "".join(f"{100 * row[n]:9.1f}" for n in names))
    return "\n".join(lines)


def write_results(results: dict[str, dict[str, float]], path: os.PathLike) -> None:
    """Writes metrics as JSON (``.json``) or CSV (anything else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(results, indent=2))
        return
    names = list(next(iter(results.values())).keys())
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", *names])
        for cls, row in results.items():
            writer.writerow([cls, *(f"{row[n]:.6f}" for n in names)])


def heat_colors(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8 (a blue-to-red ramp, readable without matplotlib)."""
    v = np.clip(values, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def write_overlays(
    images: torch.Tensor,
    maps: torch.Tensor,
    scores: torch.Tensor,
    out_dir: os.PathLike,
    names: Sequence[str],
    vmax: Optional[float] = None,
) -> list[Path]:
    """PNG of each image beside its anomaly map blended over it; maps share one colour scale."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lo = float(maps.min())
    hi = float(maps.max()) if vmax is None else vmax
    paths = []
    for img, m, s, name in zip(images, maps, scores, names):
        rgb = (img.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        heat = heat_colors((m.cpu().numpy() - lo) / max(hi - lo, 1e-12))
        blend = (0.55 * rgb + 0.45 * heat).astype(np.uint8)
        panel = np.concatenate([rgb, blend], axis=1)
        # the parent folder keeps 'bad/000.png' and 'good/000.png' apart
        path = out / f"{Path(name).parent.name}_{Path(name).stem}_score{float(s):.3f}.png"
        Image.fromarray(panel).save(path)
        paths.append(path)
    return paths
