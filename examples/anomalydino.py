"""AnomalyDINO-style few-shot anomaly detection with ``raid_fast.knn`` (cosine distance, k = 1).

AnomalyDINO (Damm et al., WACV 2025) needs no training: the patch features of a few normal
reference images of a class form its memory bank; a test patch's anomaly score is the cosine
distance ``1 - cos`` to its nearest reference patch; the image score is the mean of the highest 1 %
of the patch scores; the anomaly map is the patch-score grid upsampled (bilinear) to the image
size and smoothed with a Gaussian of sigma 4. The nearest-neighbour search, the one step that
grows with the number of shots, is a single ``raid_fast.knn(..., metric="cosine")`` call. The
authors' optional background masking and rotation augmentation of the references are left out:
the embedded classes are textures.

Backbone: AnomalyDINO uses DINOv2 ViT-S/14, whose weights cannot be fetched offline; by default
this example uses raid_fast's packaged ``efficientnet_lite0`` (176-dim tokens on a stride-8 grid,
32 x 32 patches at its 256 px input). With a local DINOv2 file (official checkpoint or timm's
safetensors): ``--backbone dinov2_vits14 --weights FILE`` (448 px input, 32 x 32 patches).

Data: raid_fast's embedded dataset (MVTec layout; classes brick, grass, gravel; the generator's
default image counts, printed at the start) generated at 256 x 256 px, Lite0's input size; the
references are drawn from each class's normal training images (seeded). Prints the seven metrics
of ``raid_fast.detect.metrics`` per class and their mean, for each number of shots.

Run::

    python examples/anomalydino.py                 # 1, 2 and 4 shots
    python examples/anomalydino.py --shots 8 --backbone dinov2_vits14 --weights dinov2_vits14_pretrain.pth
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

import raid_fast
from raid_fast.data import MVTecDataset, make_embedded_dataset
from raid_fast.detect.anomaly_map import AnomalyMapGenerator, top_percent_mean
from raid_fast.detect.metrics import IMAGE_METRICS, PIXEL_METRICS, evaluate_per_class

METRICS = IMAGE_METRICS + PIXEL_METRICS


def load_split(root: str, name: str, split: str, size: int):
    """Images [N, 3, S, S] in [0, 1], masks [N, S, S] and labels [N] of one class."""
    ds = MVTecDataset(root, classes=[name], split=split, image_size=size)
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"][0] for it in items])
    return images, masks, np.array([it["label"] for it in items])


@torch.no_grad()
def patch_tokens(backbone, images: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch tokens [N, h * w, D] and the (h, w) grid; the backbone resizes and normalises."""
    out = [backbone(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([tokens for tokens, _, _ in out]), out[0][2]


def anomalydino(
    test_tokens: torch.Tensor, bank: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores [B] and anomaly maps [B, H, W] of test tokens [B, L, D] against a bank [N, D]."""
    dist, _ = raid_fast.knn(test_tokens, bank, k=1, metric="cosine")  # [B, L, 1], 1 - cos
    score_map = dist[..., 0].view(-1, *grid)  # [B, h, w]
    # the mean of the top 1 % of patch scores, on the patch grid, before any smoothing
    scores = top_percent_mean(score_map, percent=1.0)
    maps = AnomalyMapGenerator(sigma=4.0)(score_map, image_size)
    return scores, maps


def table(rows: dict, label: str) -> list[str]:
    return [
        f"{label:<6}{str(name):<8}" + "".join(f"{100 * row[k]:9.2f}" for k in METRICS) for name, row in rows.items()
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="dataset root (default: the embedded dataset in a temporary folder)")
    p.add_argument("--image-size", type=int, default=256, help="side of the images the metrics are computed at")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4], help="normal reference images per class")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=("efficientnet_lite0", "dinov2_vits14"))
    p.add_argument("--weights", default=None, help="backbone weights file (needed for dinov2_vits14)")
    p.add_argument("--backbone-size", type=int, default=None, help="backbone input size (default: its own)")
    p.add_argument("--seed", type=int, default=0, help="seeds the dataset and the choice of references")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    backbone = raid_fast.load_backbone(args.backbone, weights=args.weights, image_size=args.backbone_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or os.path.join(tmp, "embedded")
        if not os.path.isdir(root):
            make_embedded_dataset(root, seed=args.seed, image_size=args.image_size)
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        data = {
            c: (load_split(root, c, "train", args.image_size), load_split(root, c, "test", args.image_size))
            for c in classes
        }
    t_data = time.perf_counter() - t_start

    # the references: the first n of one seeded permutation, so more shots only add images
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    feats = {}
    for c, ((train, _, _), (test, _, _)) in data.items():
        if not 1 <= min(args.shots) <= max(args.shots) <= len(train):
            p.error(f"--shots must lie in [1, {len(train)}] (class {c} has {len(train)} training images)")
        order = rng.permutation(len(train))[: max(args.shots)]
        ref_tokens, grid = patch_tokens(backbone, train[order])  # [S, L, D]
        test_tokens, _ = patch_tokens(backbone, test)  # [B, L, D]
        feats[c] = (ref_tokens, test_tokens)
    t_feat = time.perf_counter() - t0
    (train, _, _), (test, _, test_labels) = data[classes[0]]
    print(
        f"AnomalyDINO-style detection, {backbone.name} at {backbone.image_size[0]} px ({grid[0]} x {grid[1]} "
        f"patches, D = {backbone.dim}), torch threads {torch.get_num_threads()}\n"
        f"data: {', '.join(classes)} at {args.image_size} px; per class {len(train)} training images, "
        f"{len(test)} test images ({int((test_labels == 0).sum())} normal); backbone + data {t_data:.1f} s, features {t_feat:.1f} s"
    )

    lines = [f"{'shots':<6}{'class':<8}" + "".join(f"{k:>9}" for k in METRICS)]
    masks = torch.cat([data[c][1][1] for c in classes])
    labels = np.concatenate([data[c][1][2] for c in classes])
    names = [c for c in classes for _ in range(len(data[c][1][2]))]
    for shots in args.shots:
        t0 = time.perf_counter()
        scores, maps = [], []
        for c in classes:
            ref_tokens, test_tokens = feats[c]
            bank = ref_tokens[:shots].reshape(-1, ref_tokens.shape[-1])  # [shots * L, D]
            s, m = anomalydino(test_tokens, bank, grid, masks.shape[-2:])
            scores.append(s)
            maps.append(m)
        t_search = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = evaluate_per_class(torch.cat(scores), labels, names, torch.cat(maps), masks)
        t_metrics = time.perf_counter() - t0
        lines += table(rows, str(shots))
        print(
            f"  {shots} shot(s): bank {shots * grid[0] * grid[1]} patches per class, kNN + maps for "
            f"{len(names)} images {t_search:.2f} s, metrics {t_metrics:.1f} s"
        )
    print("\nmetrics x 100")
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t_start:.1f} s (after imports)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
