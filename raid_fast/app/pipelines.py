"""The jobs behind the command line, as functions: build a database, train the filter, predict and
evaluate datasets.

Letters: B images, H x W image size, D token dim.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raid_fast import _checks
from raid_fast.data import load_datasets, select_templates
from raid_fast.database import TokenDatabase
from raid_fast.detect.anomaly_map import DEFAULT_IMAGE_SCORE, ImageScore
from raid_fast.detect.backbones import load_backbone
from raid_fast.detect.checkpoints import load_checkpoint
from raid_fast.detect.detector import Detector
from raid_fast.detect.metrics import evaluate_per_class
from raid_fast.detect.perlin import FOREGROUND_MODES
from raid_fast.detect.training import train

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
    weights: str | None = None,
    image_size: int = 256,
    shots: int | None = None,
    n_semantic: int = 50,
    label_free: bool = False,
    kmeans_iters: int = 25,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
    kmeans_precision: str = "fp32",
    stride: int | None = None,
    layers: Sequence[int | str] | None = None,
    aggregate: int = 1,
    image_score: str = DEFAULT_IMAGE_SCORE,
) -> TokenDatabase:
    """Templates of the train split(s) -> backbone tokens -> ``TokenDatabase`` saved at ``out``.

    The backbone name, weights, image size and token options (``stride``, ``layers``,
    ``aggregate``: see :func:`raid_fast.load_backbone`) are stored in the database's parameters
    with the detector's ``image_score`` reduction, so that training, evaluation and prediction
    rebuild the same tokens and scores (:func:`recorded_backbone`).
    """
    image_score = ImageScore(image_score).spec
    bb = load_backbone(
        backbone,
        weights=weights,
        device=device,
        image_size=image_size,
        stride=stride,
        layers=layers,
        aggregate=aggregate,
    )
    train = load_datasets(list(roots), split="train", image_size=image_size)
    chosen = select_templates(train, shots, seed=seed)
    indices = sorted(i for idx in chosen.values() for i in idx)
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
        kmeans_precision=kmeans_precision,
        progress=progress,
    )
    db.params.update(
        {
            "backbone": backbone,
            "weights": weights,
            "image_size": image_size,
            "backbone_options": bb.options,
            "image_score": image_score,
            "class_names": list(train.classes),
            # resolved, so that training finds its templates from any working directory
            "template_paths": [_resolved(train.samples[i].path) for i in indices],
        }
    )
    db.save(out)
    return db


# the tokens of databases written before their options were recorded
LEGACY_BACKBONE_OPTIONS = {"efficientnet_lite0": {"stride": 16, "layers": [2, 4], "aggregate": 1}}
BACKBONE_OPTION_KEYS = ("stride", "layers", "aggregate")


def recorded_backbone(params: dict, device: str = "cpu", precision: str = "fp32"):
    """The backbone a database was built with (name, weights, image size, token options), from its
    ``params``; a database without recorded options gets the tokens of its time
    (:data:`LEGACY_BACKBONE_OPTIONS`)."""
    options = params.get("backbone_options")
    if options is None:
        options = LEGACY_BACKBONE_OPTIONS.get(params["backbone"], {})
    if not isinstance(options, dict) or not set(options) <= set(BACKBONE_OPTION_KEYS):
        msg = f"the database's params['backbone_options'] must be a dict with keys among {BACKBONE_OPTION_KEYS}, got {options!r}"
        raise ValueError(msg)
    return load_backbone(
        params["backbone"],
        weights=params.get("weights"),
        device=device,
        image_size=params["image_size"],
        precision=precision,
        **options,
    )


def database_class_names(db: TokenDatabase) -> list[str | None]:
    """Dataset class name of each database class; None for all of them in a label-free database."""
    names = db.params.get("class_names")
    if names is None or db.params.get("mode") != "labels":
        return [None] * db.n_classes
    return [names[int(lab)] for lab in db.params["class_labels"]]


def _resolved(path: os.PathLike) -> str:
    return str(Path(path).resolve())


def training_set(
    roots: Sequence[os.PathLike],
    db: TokenDatabase,
    backbone,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The train split(s) as training queries of the filter.

    Returns ``images [N, 3, H, W]`` (CPU, the database's image size), ``image_ids [N]`` (the
    template id of each image in ``db``, so that training excludes it from its own retrieval; -1
    for an image that is not a template) and ``class_ids [N]`` (the database class: the template's,
    the class of the same name in a labelled database, or the CLS routing in a label-free one).
    """
    size = db.params["image_size"]
    train = load_datasets(list(roots), split="train", image_size=size)
    templates = {_resolved(p): i for i, p in enumerate(db.params.get("template_paths", []))}
    image_ids = torch.tensor([templates.get(_resolved(s.path), -1) for s in train.samples], dtype=torch.int64)
    if templates and not bool((image_ids >= 0).any()):
        logger.warning("raid_fast: none of the training images is a template of the database; is --data the same?")
    images = torch.stack([train[i]["image"] for i in range(len(train))])  # [N, 3, H, W]
    class_ids = torch.full((len(train),), -1, dtype=torch.int64)
    in_db = image_ids >= 0
    class_ids[in_db] = db.image_class.cpu()[image_ids[in_db]]
    rest = torch.nonzero(~in_db).flatten()
    if rest.numel() > 0:
        names = database_class_names(db)
        if names[0] is not None:
            by_name = {n: c for c, n in enumerate(names)}
            for i in rest.tolist():
                name = train.classes[int(train.class_ids[i])]
                if name not in by_name:
                    msg = f"training image {train.samples[i].path} is of class {name!r}, which the database lacks (classes: {names})"
                    raise ValueError(msg)
                class_ids[i] = by_name[name]
        else:
            _, cls, _ = encode(backbone, train, rest.tolist(), batch_size, progress, desc="route")
            class_ids[rest] = db.classify(cls.to(db.device)).cpu()
    return images, image_ids, class_ids


def foreground_modes(db: TokenDatabase, spec: Sequence[str] | None) -> dict[int, str] | None:
    """``{database class id: "dark" | "bright"}`` from ``["auto"]`` (the authors' per-class modes
    of :data:`raid_fast.detect.perlin.FOREGROUND_MODES`) or ``["<class>=dark", ...]``; None for no spec."""
    if not spec:
        return None
    names = database_class_names(db)
    if names[0] is None:
        msg = "foreground modes need a labelled database (class names); this one is label-free"
        raise ValueError(msg)
    if list(spec) == ["auto"]:
        modes = {
            c: FOREGROUND_MODES[n.split("/")[-1]] for c, n in enumerate(names) if n.split("/")[-1] in FOREGROUND_MODES
        }
        return modes or None
    by_name = {n: c for c, n in enumerate(names)}
    modes = {}
    for item in spec:
        name, sep, mode = str(item).partition("=")
        if not sep or name not in by_name or mode not in ("dark", "bright"):
            msg = (
                f"foreground must be 'auto' or '<class>=dark|bright' with a class of the database {names}, got {item!r}"
            )
            raise ValueError(msg)
        modes[by_name[name]] = mode
    return modes


def train_filter(
    roots: Sequence[os.PathLike],
    db_path: os.PathLike,
    config,
    resume: bool = False,
    progress: bool = True,
    device: str = "cpu",
    overwrite: bool = False,
):
    """Trains the guided MoE filter on the train split(s) with the database at ``db_path``.

    ``config`` is a :class:`raid_fast.TrainConfig`; its image size is set to the database's and its
    ``out_dir`` receives ``last.pt`` / ``best.pt`` (``overwrite``: replace another run's, see
    :func:`raid_fast.train`). Returns ``(filter, history)``.
    """
    db = TokenDatabase.load(db_path, device=device)
    p = _recorded_params(db, db_path)
    # mixed precision covers the frozen backbone too (no gradients flow through it)
    precision = "bf16" if config.amp and torch.device(device).type == "cuda" else "fp32"
    bb = recorded_backbone(p, device, precision)
    images, image_ids, class_ids = training_set(roots, db, bb, progress=progress)
    config.image_size = p["image_size"]
    config.device = device
    return train(config, bb, db, images, image_ids, class_ids, resume=resume, progress=progress, overwrite=overwrite)


def _recorded_params(db: TokenDatabase, db_path: os.PathLike) -> dict:
    if "backbone" not in db.params or "image_size" not in db.params:
        msg = f"{str(db_path)!r} does not record its backbone; build it with `raid-fast build-db`"
        raise ValueError(msg)
    return db.params


def load_filter(path: os.PathLike, device: str = "cpu"):
    """``(GuidedMoEFilter, training config dict)`` from a checkpoint written by training.

    The file is read as data (see :mod:`raid_fast.detect.checkpoints`): an old-format (pickled),
    damaged or foreign file raises ``ValueError`` naming it, and nothing in it is executed.
    """
    filter, ckpt = load_checkpoint(Path(path), map_location=device)
    return filter.to(device).eval(), ckpt["config"]


def detector_from_database(
    db_path: os.PathLike,
    device: str = "cpu",
    filter_path: os.PathLike | None = None,
    k: int | None = None,
    nprobe: int | None = None,
    mode: str | None = None,
    image_score: str | None = None,
    **kwargs: Any,
):
    """Loads a database, the backbone it was built with and optionally a trained filter.

    With a filter, ``k`` is the filter's depth and ``nprobe``/``mode`` default to its training
    configuration; without one, to 150 / 5 / ``"hierarchical"``. ``image_score`` defaults to the
    one the database records. Returns ``(Detector, db)``.
    """
    db = TokenDatabase.load(db_path, device=device)
    p = _recorded_params(db, db_path)
    bb = recorded_backbone(p, device)
    if image_score is None:
        image_score = p.get("image_score", DEFAULT_IMAGE_SCORE)
    filter, cfg = None, {}
    if filter_path is not None:
        filter, cfg = load_filter(filter_path, device)
        if filter.dim != db.dim:
            msg = f"filter {str(filter_path)!r} was trained on D={filter.dim} tokens, the database holds D={db.dim}"
            raise ValueError(msg)
        if k is not None and k != filter.k:
            msg = f"k must equal the filter's cost-volume depth {filter.k}, got k={k}"
            raise ValueError(msg)
        k = filter.k
    k = k if k is not None else 150
    if nprobe is None:
        nprobe = _checks.check_int("the checkpoint's config['nprobe']", cfg.get("nprobe", 5), 1)
    if mode is None:
        mode = cfg.get("mode", "hierarchical")
        _checks.check_choice("the checkpoint's config['mode']", mode, ("hierarchical", "flat"))
    return Detector(bb, db, filter=filter, k=k, nprobe=nprobe, mode=mode, image_score=image_score, **kwargs), db


def predict_dataset(
    detector: Detector,
    dataset,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "predict",
    class_ids: torch.Tensor | None = None,
):
    """Scores [N], pixel maps [N, H, W] and masks [N, H, W] of every image of a dataset (CPU);
    ``class_ids`` [N] fixes each image's database class instead of routing it."""
    from tqdm.auto import tqdm

    scores, maps, masks = [], [], []
    for chunk in tqdm(
        list(_batches(list(range(len(dataset))), batch_size)), desc=desc, unit="batch", disable=not progress
    ):
        items = [dataset[i] for i in chunk]
        ids = None if class_ids is None else class_ids[chunk[0] : chunk[0] + len(chunk)]
        out = detector.predict(torch.stack([it["image"] for it in items]), class_ids=ids)
        scores.append(out.score.cpu())
        maps.append(out.pixel_map.cpu())
        masks.append(torch.stack([it["mask"][0] for it in items]))
    return torch.cat(scores), torch.cat(maps), torch.cat(masks)


def dataset_metrics(
    dataset, scores: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor
) -> dict[str, dict[str, float]]:
    """Per-class metrics (and their mean) of predictions on a dataset's test split."""
    classes = [dataset.classes[c] for c in np.asarray(dataset.class_ids)]
    return evaluate_per_class(scores, torch.as_tensor(np.asarray(dataset.labels)), classes, maps, masks)


def evaluate_dataset(
    detector: Detector,
    roots: Sequence[os.PathLike],
    image_size: int,
    batch_size: int = 8,
    progress: bool = True,
    route_unknown: bool = False,
) -> dict[str, dict[str, float]]:
    """Per-class metrics (and their mean) of a detector on the test split(s); a test class the
    database has no templates of is refused unless ``route_unknown`` (see :func:`check_known_classes`)."""
    test = load_datasets(list(roots), split="test", image_size=image_size)
    check_known_classes(test, detector.db, route_unknown)
    return dataset_metrics(test, *predict_dataset(detector, test, batch_size, progress, desc="eval"))


def check_known_classes(dataset, db: TokenDatabase, route_unknown: bool = False) -> list[str]:
    """The classes of ``dataset`` that ``db`` holds no templates of (by the class names it records).

    Such images would be scored against the templates of whichever class their CLS token is
    nearest, which measures nothing about their own class: refused (``ValueError``) unless
    ``route_unknown`` asks for exactly that label-free routing (then a warning names them).
    """
    known = db.params.get("class_names")
    if known is None:
        return []
    unknown = [c for c in dataset.classes if c not in set(known)]
    if unknown and not route_unknown:
        msg = (
            f"the database has no templates of the test classes {unknown} (its classes: {known}); their images "
            "would be scored against another class's templates. Evaluate the classes it was built from, rebuild "
            "it with these classes, or pass --route-unknown-classes to route them by their CLS token on purpose"
        )
        raise ValueError(msg)
    if unknown:
        logger.warning("raid_fast: classes %s are not in the database; routed by their CLS token", unknown)
    return unknown


def resolve_class(db: TokenDatabase, name: str) -> int:
    """The database class id of a dataset class name (labelled databases only)."""
    names = database_class_names(db)
    if names[0] is None:
        msg = f"--class needs a database built with labels; this one is label-free (classes: {db.params.get('class_names')})"
        raise ValueError(msg)
    if name not in names:
        msg = f"--class must be a class of the database {names}, got {name!r}"
        raise ValueError(msg)
    return names.index(name)


def predict_files(
    detector: Detector,
    paths: Sequence[os.PathLike],
    image_size: int,
    out_dir: os.PathLike | None = None,
    batch_size: int = 8,
    class_id: int | None = None,
    on_batch=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[N]`` and routed class ids ``[N]`` of image files, streamed in batches.

    Only one batch of images is in memory at a time. With ``out_dir``, an overlay PNG per image is
    written on one colour scale over all images (a second pass re-reads each batch and re-upsamples
    its token-grid score map, which is cheap beside the backbone). ``class_id`` fixes the database
    class of every image instead of routing by CLS; ``on_batch(paths, scores, class_ids)`` is
    called after each batch of the first pass.
    """
    from raid_fast.app.figures import write_overlays
    from raid_fast.data import load_image

    paths = [str(p) for p in paths]
    size = (image_size, image_size)
    scores, classes, score_maps = [], [], []
    lo, hi = float("inf"), float("-inf")
    for chunk in _batches(paths, batch_size):
        images = torch.stack([load_image(p, size) for p in chunk])
        ids = None if class_id is None else torch.full((len(chunk),), class_id, dtype=torch.int64)
        out = detector.predict(images, class_ids=ids)
        scores.append(out.score.cpu())
        classes.append(out.class_ids.cpu())
        score_maps.append(out.score_map)
        lo, hi = min(lo, float(out.pixel_map.min())), max(hi, float(out.pixel_map.max()))
        if on_batch is not None:
            on_batch(chunk, scores[-1], classes[-1])
    if out_dir is not None:
        taken: set[str] = set()
        for chunk, smap, sc in zip(_batches(paths, batch_size), score_maps, scores):
            images = torch.stack([load_image(p, size) for p in chunk])
            maps = detector.maps(smap, size)
            write_overlays(images, maps, sc, out_dir, chunk, vmax=hi, vmin=lo, taken=taken)
    return torch.cat(scores), torch.cat(classes)
