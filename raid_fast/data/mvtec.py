"""Datasets in MVTec layout and k-shot template selection.

Letters: N images, H x W pixels.

On-disk layout (MVTec AD; VisA's 1cls split, MPDD and BTAD use or convert to it)::

    <root>/<class>/train/good/*.png|jpg|...
    <root>/<class>/test/<type>/*            type "good" = normal, any other = anomalous
    <root>/<class>/ground_truth/<type>/<stem>_mask.png   (MVTec, MPDD)
    <root>/<class>/ground_truth/<type>/<stem>.png        (VisA 1cls, BTAD)

Files at the top level of ``root`` (MVTec's license.txt and readme.txt) and hidden entries are
ignored. Masks are binarised at half their range (``> 127`` for 0/255 masks; 0/1 masks are read as
such, see :func:`raid_fast.data.load_mask`) and must have their image's size (another size is an
error, never a silent resize). An anomalous image whose mask is missing gets an
all-zero mask and keeps label 1 (the authors' behaviour), with one warning per missing
``ground_truth/<type>`` folder; ``strict_masks=True`` makes a missing mask an error instead.

Items are dicts: ``image`` float32 [3, H, W] in [0, 1], ``mask`` float32 [1, H, W] in {0, 1}
(all zeros for normal and training images), ``label`` int (0 normal, 1 anomalous),
``class_name`` str, ``class_id`` int, ``defect_type`` str, ``path`` str. Images are resized with
PIL (bicubic), masks with nearest neighbour.

Settings: full-shot multi-class (:class:`MVTecDataset` with every class),
k-shot templates (:func:`select_templates`), multi-dataset (:class:`MultiDataset`,
:func:`load_datasets`).
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from raid_fast import _checks
from raid_fast.data.images import IMAGE_EXTENSIONS, PathLike, image_size, load_image, load_mask


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, before loading.

    Attributes:
        path: image file.
        class_name: class folder name.
        defect_type: ``"good"`` or the test sub-folder name.
        label: 0 normal, 1 anomalous.
        mask_path: ground-truth mask file, or ``None`` (normal image, or mask missing).
    """

    path: str
    class_name: str
    defect_type: str
    label: int
    mask_path: str | None


def _image_size(image_size: Any) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        s = _checks.check_int("image_size", image_size, 1)
        return s, s
    if isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        return _checks.check_int("image_size[0]", image_size[0], 1), _checks.check_int(
            "image_size[1]", image_size[1], 1
        )
    msg = f"image_size must be an int, an (H, W) pair or None, got {image_size!r}"
    raise ValueError(msg)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            p = gt_dir / f"{name}{ext}"
            if p.is_file():
                return p
    return None


class MVTecDataset(Dataset):
    """Images of one root in MVTec layout (MVTec AD, VisA 1cls, MPDD, BTAD, the embedded set).

    Args:
        root: dataset root holding one folder per class.
        classes: class folder names to load (in this order); ``None`` takes every folder under
            ``root`` (sorted; top-level files and hidden entries are ignored).
        split: ``"train"`` (``train/good`` only, label 0) or ``"test"`` (every ``test/<type>``).
        image_size: output size, an int (square), ``(H, W)`` or ``None`` (native size).
        strict_masks: raise when an anomalous test image has no mask, instead of a zero mask.
        name: dataset name used to prefix clashing class names in :class:`MultiDataset`;
            defaults to the root folder's name.

    Raises:
        FileNotFoundError: ``root`` or a requested class folder does not exist, a class lacks
            ``train/good`` (train split) or ``test`` (test split), or a mask is missing under
            ``strict_masks``.
        ValueError: a split folder holds no image, or an argument is invalid.

    Example:
        >>> ds = MVTecDataset("data/mvtec", split="test", image_size=256)
        >>> item = ds[0]; item["image"].shape, item["mask"].shape, item["label"]
        (torch.Size([3, 256, 256]), torch.Size([1, 256, 256]), 0)
    """

    def __init__(
        self,
        root: PathLike,
        classes: Sequence[str] | None = None,
        split: str = "train",
        image_size: Any = 256,
        strict_masks: bool = False,
        name: str | None = None,
    ) -> None:
        _checks.check_choice("split", split, ("train", "test"))
        self.root = Path(root)
        self.split = split
        self.image_size = _image_size(image_size)
        self.strict_masks = bool(strict_masks)
        if not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            msg = f"dataset root {str(self.root)!r} {what} (expected <root>/<class>/train/good and <root>/<class>/test/<type>)"
            raise FileNotFoundError(msg)
        self.name = name if name is not None else (self.root.resolve().name or "dataset")
        if classes is None:
            found = [p.name for p in _visible_dirs(self.root)]
            if not found:
                msg = f"dataset root {str(self.root)!r} holds no class folder (expected <root>/<class>/train/good)"
                raise FileNotFoundError(msg)
            classes = found
        elif isinstance(classes, str):
            classes = [classes]
        self.classes: list[str] = list(classes)
        if len(set(self.classes)) != len(self.classes):
            msg = f"classes must be distinct, got {self.classes}"
            raise ValueError(msg)
        self.samples: list[Sample] = []
        for c in self.classes:
            self.samples.extend(self._scan_class(c))
        index = {c: i for i, c in enumerate(self.classes)}
        self.class_ids = np.array([index[s.class_name] for s in self.samples], dtype=np.int64)  # [N]
        self.labels = np.array([s.label for s in self.samples], dtype=np.int64)  # [N]

    def _scan_class(self, c: str) -> list[Sample]:
        cdir = self.root / c
        if not cdir.is_dir():
            msg = f"class folder {str(cdir)!r} does not exist (classes found: {[p.name for p in _visible_dirs(self.root)]})"
            raise FileNotFoundError(msg)
        if self.split == "train":
            good = cdir / "train" / "good"
            if not good.is_dir():
                msg = f"class {c!r}: folder {str(good)!r} does not exist (MVTec layout needs <root>/<class>/train/good)"
                raise FileNotFoundError(msg)
            files = _image_files(good)
            if not files:
                msg = f"class {c!r}: folder {str(good)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)})"
                raise ValueError(msg)
            return [Sample(str(p), c, "good", 0, None) for p in files]
        test = cdir / "test"
        if not test.is_dir():
            msg = f"class {c!r}: folder {str(test)!r} does not exist (MVTec layout needs <root>/<class>/test/<type>)"
            raise FileNotFoundError(msg)
        out: list[Sample] = []
        for tdir in _visible_dirs(test):
            files = _image_files(tdir)
            if tdir.name == "good":
                out.extend(Sample(str(p), c, "good", 0, None) for p in files)
                continue
            gt_dir = cdir / "ground_truth" / tdir.name
            if not gt_dir.is_dir():
                if self.strict_masks:
                    msg = f"class {c!r}: mask folder {str(gt_dir)!r} does not exist for the anomalous images in {str(tdir)!r}"
                    raise FileNotFoundError(msg)
                if files:
                    warnings.warn(
                        f"class {c!r}: mask folder {str(gt_dir)!r} does not exist; its {len(files)} anomalous "
                        "image(s) get all-zero masks (label 1 kept)",
                        stacklevel=3,
                    )
            missing = 0
            for p in files:
                mask = _find_mask(gt_dir, p.stem) if gt_dir.is_dir() else None
                if mask is None and gt_dir.is_dir():
                    if self.strict_masks:
                        msg = f"class {c!r}: no mask for {str(p)!r} in {str(gt_dir)!r} (expected {p.stem}_mask.png or {p.stem}.png)"
                        raise FileNotFoundError(msg)
                    missing += 1
                out.append(Sample(str(p), c, tdir.name, 1, None if mask is None else str(mask)))
            if missing:
                warnings.warn(
                    f"class {c!r}: {missing} anomalous image(s) in {str(tdir)!r} have no mask in {str(gt_dir)!r} "
                    "(expected <stem>_mask.png or <stem>.png); they get all-zero masks (label 1 kept)",
                    stacklevel=3,
                )
        if not out:
            msg = f"class {c!r}: folder {str(test)!r} holds no image under test/<type>/"
            raise ValueError(msg)
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        image = load_image(s.path, self.image_size)  # [3, H, W]
        h, w = image.shape[1:]
        if s.mask_path is not None:
            # a mask of another size is another image's mask, or a wrong export: resizing it would
            # score the defect at the wrong pixels
            native, mask_native = image_size(s.path), image_size(s.mask_path)
            if native != mask_native:
                msg = (
                    f"mask {s.mask_path!r} is {mask_native[0]}x{mask_native[1]} but its image {s.path!r} is "
                    f"{native[0]}x{native[1]}; masks must have their image's size"
                )
                raise ValueError(msg)
        mask = load_mask(s.mask_path, (h, w)) if s.mask_path is not None else torch.zeros(1, h, w)  # [1, H, W]
        return {
            "image": image,
            "mask": mask,
            "label": s.label,
            "class_name": s.class_name,
            "class_id": int(self.class_ids[i]),
            "defect_type": s.defect_type,
            "path": s.path,
        }

    def __repr__(self) -> str:
        return f"MVTecDataset(root={str(self.root)!r}, split={self.split!r}, classes={len(self.classes)}, images={len(self)})"


class MultiDataset(Dataset):
    """Several datasets as one (the multi-dataset setting: one model, several roots).

    Class names that occur in more than one dataset are prefixed by the dataset's name
    (``"<name>/<class>"``); unique names are kept. When datasets share a name as well, the
    prefix gets the dataset's position (``"<name>#<i>/<class>"``).

    Args:
        datasets: datasets with ``classes``, ``samples``, ``class_ids``, ``labels`` (e.g.
            :class:`MVTecDataset`), all of the same split.

    Items are those of the member dataset with ``class_name``/``class_id`` remapped to this
    dataset's global ``classes`` and a ``dataset`` key holding the member's name.
    """

    def __init__(self, datasets: Sequence[MVTecDataset]) -> None:
        self.datasets = list(datasets)
        if not self.datasets:
            msg = "datasets must hold at least one dataset, got an empty sequence"
            raise ValueError(msg)
        names = [getattr(d, "name", f"dataset{i}") for i, d in enumerate(self.datasets)]
        prefixes = [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
        counts: dict[str, int] = {}
        for d in self.datasets:
            for c in d.classes:
                counts[c] = counts.get(c, 0) + 1
        self.classes: list[str] = []
        self._class_maps: list[np.ndarray] = []
        for d, prefix in zip(self.datasets, prefixes):
            start = len(self.classes)
            self.classes.extend(f"{prefix}/{c}" if counts[c] > 1 else c for c in d.classes)
            self._class_maps.append(np.arange(start, start + len(d.classes), dtype=np.int64))
        self._offsets = np.cumsum([0] + [len(d) for d in self.datasets])  # [len(datasets) + 1]
        self.class_ids = np.concatenate([m[d.class_ids] for m, d in zip(self._class_maps, self.datasets)])  # [N]
        self.labels = np.concatenate([d.labels for d in self.datasets])  # [N]
        self.samples = [s for d in self.datasets for s in d.samples]
        self._prefixes = prefixes

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            msg = f"index {i} out of range for a dataset of {n} images"
            raise IndexError(msg)
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        item = dict(self.datasets[k][i - int(self._offsets[k])])
        item["class_id"] = int(self.class_ids[i])
        item["class_name"] = self.classes[item["class_id"]]
        item["dataset"] = self._prefixes[k]
        return item


def load_datasets(
    roots: PathLike | Sequence[PathLike],
    split: str = "train",
    image_size: Any = 256,
    classes: Sequence[str] | None = None,
    **kwargs: Any,
) -> MVTecDataset | MultiDataset:
    """One :class:`MVTecDataset` for one root; a :class:`MultiDataset` for several.

    Args:
        roots: a root or a sequence of roots.
        split: ``"train"`` or ``"test"``.
        image_size: as :class:`MVTecDataset`.
        classes: class names to keep (per root; only with a single root).
        **kwargs: passed to :class:`MVTecDataset`.
    """
    if isinstance(roots, (str, os.PathLike)):
        return MVTecDataset(roots, classes=classes, split=split, image_size=image_size, **kwargs)
    roots = list(roots)
    if classes is not None and len(roots) != 1:
        msg = f"classes can only be given with a single root, got {len(roots)} roots"
        raise ValueError(msg)
    sets = [MVTecDataset(r, classes=classes, split=split, image_size=image_size, **kwargs) for r in roots]
    return sets[0] if len(sets) == 1 else MultiDataset(sets)


def select_templates(
    dataset: Any,
    shots: int | None,
    seed: int = 0,
    max_per_class: int | None = None,
) -> dict[str, list[int]]:
    """Chooses ``shots`` template images per class (the k-shot setting), reproducibly.

    Each class draws from its own generator seeded by ``(seed, crc32(class name))``, so a class's
    choice does not depend on the other classes, and the first ``k`` of a permutation are taken,
    so the 1-shot set is inside the 2-shot set, which is inside the 4-shot set.

    Args:
        dataset: a dataset with ``classes`` and ``class_ids [N]`` (:class:`MVTecDataset`,
            :class:`MultiDataset`), normally the train split.
        shots: images per class; ``None`` (or more than available) takes all.
        seed: selection seed.
        max_per_class: cap applied on top of ``shots`` (the authors build their database from
            at most 80 MVTec / 100 VisA images per class).

    Returns:
        ``{class_name: sorted dataset indices}``, classes in ``dataset.classes`` order. Only
        normal images (``labels == 0`` where the dataset has labels) are candidates.
    """
    if shots is not None:
        shots = _checks.check_int("shots", shots, 1)
    if max_per_class is not None:
        max_per_class = _checks.check_int("max_per_class", max_per_class, 1)
    seed = _checks.check_int("seed", seed)
    class_ids = np.asarray(dataset.class_ids)
    labels = np.asarray(getattr(dataset, "labels", np.zeros_like(class_ids)))
    out: dict[str, list[int]] = {}
    for ci, name in enumerate(dataset.classes):
        idx = np.flatnonzero((class_ids == ci) & (labels == 0))
        cap = len(idx) if shots is None else shots
        if max_per_class is not None:
            cap = min(cap, max_per_class)
        if cap < len(idx):
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            idx = np.sort(idx[rng.permutation(len(idx))[:cap]])
        out[name] = [int(i) for i in idx]
    return out
