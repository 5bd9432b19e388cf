"""Datasets in MVTec layout, k-shot template selection, and the embedded default dataset.

Letters: N images, H x W pixels.

On-disk layout (MVTec AD; VisA's 1cls split, MPDD and BTAD use or convert to it)::

    <root>/<class>/train/good/*.png|jpg|...
    <root>/<class>/test/<type>/*            type "good" = normal, any other = anomalous
    <root>/<class>/ground_truth/<type>/<stem>_mask.png   (MVTec, MPDD)
    <root>/<class>/ground_truth/<type>/<stem>.png        (VisA 1cls, BTAD)

Files at the top level of ``root`` (MVTec's license.txt and readme.txt) and hidden entries are
ignored. Masks are binarised with ``> 127``. An anomalous image whose mask is missing gets an
all-zero mask and keeps label 1 (the authors' behaviour), with one warning per missing
``ground_truth/<type>`` folder; ``strict_masks=True`` makes a missing mask an error instead.

Items are dicts: ``image`` float32 [3, H, W] in [0, 1], ``mask`` float32 [1, H, W] in {0, 1}
(all zeros for normal and training images), ``label`` int (0 normal, 1 anomalous),
``class_name`` str, ``class_id`` int, ``defect_type`` str, ``path`` str. Images are resized with
PIL (bicubic), masks with nearest neighbour.

Settings (DESIGN.md section 7): full-shot multi-class (:class:`MVTecDataset` with every class),
k-shot templates (:func:`select_templates`), multi-dataset (:class:`MultiDataset`,
:func:`load_datasets`). :func:`make_embedded_dataset` writes the small default dataset generated
from scikit-image's textures.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from raid_fast import _checks

__all__ = [
    "EMBEDDED_CLASSES",
    "EMBEDDED_DEFECTS",
    "IMAGE_EXTENSIONS",
    "MVTecDataset",
    "MultiDataset",
    "Sample",
    "load_datasets",
    "make_embedded_dataset",
    "render_defect",
    "select_templates",
    "texture_crop",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
EMBEDDED_CLASSES = ("brick", "grass", "gravel")
EMBEDDED_DEFECTS = ("scratch", "stain", "patch", "hole")

PathLike = Union[str, os.PathLike]


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
    mask_path: Optional[str]


def _image_size(image_size: Any) -> Optional[tuple[int, int]]:
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


def _find_mask(gt_dir: Path, stem: str) -> Optional[Path]:
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            p = gt_dir / f"{name}{ext}"
            if p.is_file():
                return p
    return None


def load_image(path: PathLike, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Reads an image as float32 [3, H, W] in [0, 1], resized (bicubic) to ``size = (H, W)``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and (im.height, im.width) != size:
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)


def load_mask(path: PathLike, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Reads a mask as float32 [1, H, W] in {0, 1}: binarised (> 127), then resized (nearest)."""
    from PIL import Image

    with Image.open(path) as im:
        binary = Image.fromarray(((np.asarray(im.convert("L")) > 127) * 255).astype(np.uint8))
    if size is not None and (binary.height, binary.width) != size:
        binary = binary.resize((size[1], size[0]), Image.NEAREST)
    return torch.from_numpy((np.asarray(binary) > 127).astype(np.float32))[None]


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
        classes: Optional[Sequence[str]] = None,
        split: str = "train",
        image_size: Any = 256,
        strict_masks: bool = False,
        name: Optional[str] = None,
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
    roots: Union[PathLike, Sequence[PathLike]],
    split: str = "train",
    image_size: Any = 256,
    classes: Optional[Sequence[str]] = None,
    **kwargs: Any,
) -> Union[MVTecDataset, MultiDataset]:
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
    shots: Optional[int],
    seed: int = 0,
    max_per_class: Optional[int] = None,
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


_TINTS = {
    "brick": (1.15, 0.62, 0.45),
    "grass": (0.55, 1.0, 0.38),
    "gravel": (0.95, 0.9, 0.8),
}


def _texture(name: str) -> np.ndarray:
    """uint8 [512, 512, 3]: a scikit-image texture, tinted so the classes differ in colour too."""
    try:
        from skimage import data as skdata
    except ImportError as e:  # pragma: no cover
        msg = "the embedded dataset needs scikit-image (pip install scikit-image)"
        raise ImportError(msg) from e
    fn = getattr(skdata, name, None)
    if fn is None:
        msg = f"scikit-image has no texture skimage.data.{name}() (known here: {list(_TINTS)})"
        raise ValueError(msg)
    gray = np.asarray(fn(), dtype=np.float32)
    if gray.ndim == 3:
        gray = gray[..., :3].mean(-1)
    tint = np.asarray(_TINTS.get(name, (1.0, 1.0, 1.0)), dtype=np.float32)
    return np.clip(np.rint(gray[..., None] * tint), 0, 255).astype(np.uint8)


def texture_crop(texture: np.ndarray, size: int, rng: np.random.Generator, scale: float = 1.5) -> np.ndarray:
    """A random crop of ``texture`` (window ``size * scale``, capped by the texture), randomly
    flipped, resized to ``size`` (bicubic), with mild brightness jitter and sensor noise.

    Returns:
        uint8 [size, size, 3].
    """
    from PIL import Image

    th, tw = texture.shape[:2]
    win = int(min(th, tw, max(8, round(size * scale))))
    y, x = int(rng.integers(0, th - win + 1)), int(rng.integers(0, tw - win + 1))
    crop = texture[y : y + win, x : x + win]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    if win != size:
        crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC))
    gain = rng.uniform(0.95, 1.05)
    noisy = crop.astype(np.float32) * gain + rng.normal(0.0, 2.0, size=crop.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _blob(h: int, w: int, rng: np.random.Generator, radius: tuple[float, float]) -> np.ndarray:
    """An irregular blob: a union of a few overlapping ellipses. bool [H, W]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
    out = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(2, 5))):
        ry, rx = rng.uniform(*radius, size=2) * min(h, w)
        oy, ox = rng.normal(0.0, 0.4 * ry), rng.normal(0.0, 0.4 * rx)
        t = rng.uniform(0, np.pi)
        dy, dx = yy - (cy + oy), xx - (cx + ox)
        u, v = dy * np.cos(t) + dx * np.sin(t), -dy * np.sin(t) + dx * np.cos(t)
        out |= (u / ry) ** 2 + (v / rx) ** 2 <= 1.0
    return out


def _scratch(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """1-3 thin polyline scratches of width 1.5-3.5 px. bool [H, W]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        p = np.array([rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)])
        direction = rng.uniform(0, 2 * np.pi)
        half = rng.uniform(0.75, 1.75)
        for _ in range(int(rng.integers(2, 5))):
            direction += rng.normal(0.0, 0.4)
            q = p + rng.uniform(0.1, 0.25) * min(h, w) * np.array([np.sin(direction), np.cos(direction)])
            d = q - p
            t = np.clip(((yy - p[0]) * d[0] + (xx - p[1]) * d[1]) / max(float(d @ d), 1e-6), 0.0, 1.0)
            dist2 = (yy - p[0] - t * d[0]) ** 2 + (xx - p[1] - t * d[1]) ** 2
            out |= dist2 <= half * half
            p = q
    return out


def render_defect(
    clean: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    other: Optional[np.ndarray] = None,
    min_area: float = 0.003,
) -> tuple[np.ndarray, np.ndarray]:
    """Paints one synthetic defect on a clean crop; the mask is exactly the changed pixels.

    Kinds: ``"scratch"`` (thin dark or bright polylines), ``"stain"`` (a blob blended towards
    another colour), ``"patch"`` (a blob filled from ``other``, a crop of another texture),
    ``"hole"`` (a dark cut with a shaded rim).

    Args:
        clean: uint8 [H, W, 3] defect-free crop.
        kind: one of :data:`EMBEDDED_DEFECTS`.
        rng: numpy Generator.
        other: uint8 [H, W, 3] crop of another texture (``"patch"``; a colour-shifted ``clean``
            when ``None``).
        min_area: smallest mask area as a fraction of the image; smaller draws are redrawn.

    Returns:
        ``(image uint8 [H, W, 3], mask bool [H, W])`` with ``image != clean`` in at least one
        channel exactly where ``mask`` is True, and ``image == clean`` elsewhere.
    """
    _checks.check_choice("kind", kind, EMBEDDED_DEFECTS)
    h, w = clean.shape[:2]
    base = clean.astype(np.float32)
    for _ in range(20):
        if kind == "scratch":
            region = _scratch(h, w, rng)
            level = 15.0 if rng.random() < 0.5 else 240.0
            layer = np.full_like(base, level) + rng.normal(0.0, 6.0, size=base.shape)
        elif kind == "stain":
            region = _blob(h, w, rng, (0.05, 0.14))
            colour = rng.uniform(0, 255, size=3).astype(np.float32)
            alpha = rng.uniform(0.55, 0.85)
            layer = (1 - alpha) * base + alpha * colour
        elif kind == "patch":
            region = _blob(h, w, rng, (0.07, 0.16))
            src = other if other is not None else 255.0 - clean
            layer = np.asarray(src, dtype=np.float32)
        else:
            region = _blob(h, w, rng, (0.04, 0.1))
            # dark interior, lighter towards the rim (a cheap bevel from a 1-step erosion)
            inner = region.copy()
            inner[1:-1, 1:-1] &= region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
            layer = np.where(inner[..., None], 12.0, 0.45 * base) + rng.normal(0.0, 3.0, size=base.shape)
        out = np.where(region[..., None], np.clip(np.rint(layer), 0, 255), base).astype(np.uint8)
        mask = (out != clean).any(-1)
        if mask.mean() >= min_area:
            return out, mask
    msg = f"could not draw a {kind!r} defect of at least {min_area:.3%} of a {h}x{w} image in 20 tries"
    raise RuntimeError(msg)


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def make_embedded_dataset(
    out_dir: PathLike,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 24,
    n_test_good: int = 8,
    n_test_bad: int = 12,
    classes: Sequence[str] = EMBEDDED_CLASSES,
    defect_types: Sequence[str] = EMBEDDED_DEFECTS,
    overwrite: bool = False,
) -> Path:
    """Writes the embedded default dataset in MVTec layout and returns its root.

    One class per scikit-image texture (``skimage.data.brick``, ``grass``, ``gravel``, tinted
    brick-red, green and grey): ``train/good`` and ``test/good`` hold random crops (flips,
    brightness jitter, sensor noise); ``test/<type>`` holds crops with one synthetic defect of
    that type (scratch, stain of another colour, patch of another texture, hole), and
    ``ground_truth/<type>/<stem>_mask.png`` its exact mask (0/255). Defective images are spread
    round-robin over ``defect_types``. An ``embedded.json`` file at the root records the
    parameters; calling again with the same parameters reuses the files.

    Args:
        out_dir: root folder to write (created if needed).
        seed: every image is drawn from ``default_rng([seed, class, split, i])``: same seed,
            same pixels.
        image_size: square image side in pixels.
        n_train: training images per class.
        n_test_good: normal test images per class.
        n_test_bad: defective test images per class.
        classes: textures to use (names of ``skimage.data`` functions).
        defect_types: defect kinds, a subset of :data:`EMBEDDED_DEFECTS`.
        overwrite: replace class folders that exist but were not written by this function.

    Returns:
        The dataset root (``Path(out_dir)``).

    Raises:
        FileExistsError: a class folder exists in ``out_dir`` without this function's record
            and ``overwrite`` is False.
    """
    root = Path(out_dir)
    seed = _checks.check_int("seed", seed)
    image_size = _checks.check_int("image_size", image_size, 16)
    n_train = _checks.check_int("n_train", n_train, 1)
    n_test_good = _checks.check_int("n_test_good", n_test_good, 0)
    n_test_bad = _checks.check_int("n_test_bad", n_test_bad, 0)
    classes, defect_types = list(classes), list(defect_types)
    for t in defect_types:
        _checks.check_choice("defect_types", t, EMBEDDED_DEFECTS)
    if not classes or not defect_types:
        msg = f"classes and defect_types must not be empty, got {classes} and {defect_types}"
        raise ValueError(msg)
    params = {
        "version": 1,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_bad": n_test_bad,
        "classes": classes,
        "defect_types": defect_types,
    }
    record = root / "embedded.json"
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("params") == params and all((root / c).is_dir() for c in classes):
            n_files = sum(1 for c in classes for p in (root / c).rglob("*.png"))
            if n_files == old.get("n_files"):
                return root
        mine = set(old.get("params", {}).get("classes", [])) if isinstance(old, dict) else set()
    else:
        mine = set()
    for c in classes:
        if (root / c).exists() and c not in mine and not overwrite:
            msg = f"{str(root / c)!r} exists and was not written by make_embedded_dataset (pass overwrite=True to replace it)"
            raise FileExistsError(msg)
    for c in set(classes) | mine:
        if (root / c).exists():
            shutil.rmtree(root / c)
    root.mkdir(parents=True, exist_ok=True)

    textures = {c: _texture(c) for c in classes}
    n_files = 0
    for ci, c in enumerate(classes):
        tex = textures[c]
        others = [textures[o] for o in classes if o != c]
        cdir = root / c
        used = defect_types[: min(n_test_bad, len(defect_types))]
        for sub in ["train/good", "test/good"] + [f"test/{t}" for t in used] + [f"ground_truth/{t}" for t in used]:
            (cdir / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            rng = np.random.default_rng([seed, ci, 0, i])
            _save_png(texture_crop(tex, image_size, rng), cdir / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            rng = np.random.default_rng([seed, ci, 1, i])
            _save_png(texture_crop(tex, image_size, rng), cdir / "test" / "good" / f"{i:03d}.png")
        for i in range(n_test_bad):
            rng = np.random.default_rng([seed, ci, 2, i])
            kind = defect_types[i % len(defect_types)]
            clean = texture_crop(tex, image_size, rng)
            other = None
            if others:
                other = texture_crop(others[int(rng.integers(len(others)))], image_size, rng)
            image, mask = render_defect(clean, kind, rng, other)
            stem = f"{i // len(defect_types):03d}"
            _save_png(image, cdir / "test" / kind / f"{stem}.png")
            _save_png(mask.astype(np.uint8) * 255, cdir / "ground_truth" / kind / f"{stem}_mask.png")
            n_files += 1
        n_files += n_train + n_test_good + n_test_bad
    record.write_text(json.dumps({"params": params, "n_files": n_files}, indent=1))
    return root
