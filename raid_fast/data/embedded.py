"""The embedded default dataset: real scikit-image textures (brick, grass, gravel) with synthetic
defects and exact masks, written in MVTec layout so that the same loaders serve it.

Two levels of difficulty, so that image-level metrics rank methods: four easy defect kinds
(scratch, stain, patch of another texture, hole: every detector finds them) and two hard ones
(``faint``: a small blob a few grey levels off; ``rescaled``: the class's own texture at another
scale, plausible colour and grain, wrong structure), plus normal test images under changed
illumination (gain, gradient and colour cast), which must not be flagged.

Letters: H x W pixels.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from raid_fast import _checks
from raid_fast.data.images import PathLike

EMBEDDED_CLASSES = ("brick", "grass", "gravel")
EMBEDDED_DEFECTS = ("scratch", "stain", "patch", "hole", "faint", "rescaled")
# kinds a good detector still misses at image level: small or low-contrast, or texture the class has
HARD_DEFECTS = ("faint", "rescaled")


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


def relight(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same scene under other light: a global gain of 0.72-0.85 or 1.15-1.3 (training images vary
    by 0.95-1.05), a linear ramp of +-12 % across the image in a random direction and a colour cast
    of +-4 % per channel. A normal image: nothing in it is a defect.

    Args:
        image: uint8 [H, W, 3].

    Returns:
        uint8 [H, W, 3].
    """
    h, w = image.shape[:2]
    gain = rng.uniform(0.72, 0.85) if rng.random() < 0.5 else rng.uniform(1.15, 1.3)
    t = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((yy / max(h - 1, 1) - 0.5) * np.sin(t) + (xx / max(w - 1, 1) - 0.5) * np.cos(t)) * 0.24  # [H, W]
    cast = rng.uniform(0.96, 1.04, size=3).astype(np.float32)
    out = image.astype(np.float32) * (gain * (1.0 + ramp))[..., None] * cast
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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
    other: np.ndarray | None = None,
    min_area: float = 0.003,
) -> tuple[np.ndarray, np.ndarray]:
    """Paints one synthetic defect on a clean crop; the mask is exactly the changed pixels.

    Kinds: ``"scratch"`` (thin dark or bright polylines), ``"stain"`` (a blob blended towards
    another colour), ``"patch"`` (a blob filled from ``other``, a crop of another texture),
    ``"hole"`` (a dark cut with a shaded rim); the hard ones: ``"faint"`` (a small blob, radius
    2.5-5 % of the side, shifted by 12-20 grey levels, below the texture's own contrast of
    26-39) and ``"rescaled"`` (a blob filled with ``clean`` itself magnified 1.5-2 times, perhaps
    turned upside down: the class's colours and grain at the wrong scale).

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
        elif kind == "faint":
            region = _blob(h, w, rng, (0.025, 0.05))
            # mostly a brightness step (all channels alike), a little colour
            step = rng.choice((-1.0, 1.0)) * rng.uniform(12.0, 20.0)
            layer = base + step * rng.uniform(0.8, 1.2, size=3).astype(np.float32)
        elif kind == "rescaled":
            region = _blob(h, w, rng, (0.07, 0.14))
            layer = _magnified(clean, rng).astype(np.float32)
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


def _magnified(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random window of ``image`` magnified 1.5-2 times (bicubic) back to its size, turned by 0 or
    180 degrees (a turn by 90 would give brick away by its orientation alone). uint8 [H, W, 3]."""
    from PIL import Image

    h, w = image.shape[:2]
    zoom = rng.uniform(1.5, 2.0)
    wh, ww = max(2, int(round(h / zoom))), max(2, int(round(w / zoom)))
    y, x = int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1))
    big = Image.fromarray(np.ascontiguousarray(image[y : y + wh, x : x + ww])).resize((w, h), Image.BICUBIC)
    return np.rot90(np.asarray(big), k=2 * int(rng.integers(2)))


MARKER = ".raid_fast_embedded"  # written into each class folder the generator creates


def _check_class_name(name: str) -> None:
    """A class must be a plain folder name: it becomes ``root / name``, and may later be replaced."""
    if not isinstance(name, str) or name in ("", ".", "..") or name != Path(name).name or "\\" in name:
        msg = f"classes must be plain folder names (no path separators, not '.' or '..'), got {name!r}"
        raise ValueError(msg)


def _is_ours(root: Path, name: str) -> bool:
    """Whether ``root / name`` is a class folder this module wrote: a real folder (not a link)
    directly under ``root`` holding the generator's marker file."""
    folder = root / name
    return (
        name == Path(name).name
        and name not in ("", ".", "..")
        and folder.is_dir()
        and not folder.is_symlink()
        and (folder / MARKER).is_file()
    )


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def make_embedded_dataset(
    out_dir: PathLike,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 24,
    n_test_good: int = 12,
    n_test_bad: int = 18,
    classes: Sequence[str] = EMBEDDED_CLASSES,
    defect_types: Sequence[str] = EMBEDDED_DEFECTS,
    overwrite: bool = False,
    n_test_relit: int | None = None,
) -> Path:
    """Writes the embedded default dataset in MVTec layout and returns its root.

    One class per scikit-image texture (``skimage.data.brick``, ``grass``, ``gravel``, tinted
    brick-red, green and grey): ``train/good`` and ``test/good`` hold random crops (flips,
    brightness jitter, sensor noise), the last ``n_test_relit`` normal test images relit
    (``<i>_relit.png``, see :func:`relight`); ``test/<type>`` holds crops with one synthetic defect
    of that type (scratch, stain of another colour, patch of another texture, hole, and the hard
    ``faint`` and ``rescaled``, see :func:`render_defect`), and ``ground_truth/<type>/<stem>_mask.png``
    its exact mask (0/255). Defective images are spread round-robin over ``defect_types``. An
    ``embedded.json`` file at the root records the parameters; calling again with the same
    parameters reuses the files.

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
        overwrite: replace the folders of ``classes`` that exist but were not written by this
            function (each folder it writes holds a marker file, :data:`MARKER`; only such folders
            are replaced otherwise, whatever ``embedded.json`` says).
        n_test_relit: how many of the ``n_test_good`` normal test images are relit; default half.

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
    n_test_relit = n_test_good // 2 if n_test_relit is None else n_test_relit
    n_test_relit = _checks.check_int("n_test_relit", n_test_relit, 0, n_test_good)
    classes, defect_types = list(classes), list(defect_types)
    for t in defect_types:
        _checks.check_choice("defect_types", t, EMBEDDED_DEFECTS)
    if not classes or not defect_types:
        msg = f"classes and defect_types must not be empty, got {classes} and {defect_types}"
        raise ValueError(msg)
    params = {
        "version": 2,  # 2: the hard kinds and relit normal images
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_relit": n_test_relit,
        "n_test_bad": n_test_bad,
        "classes": classes,
        "defect_types": defect_types,
    }
    for c in classes:
        _check_class_name(c)
    record = root / "embedded.json"
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError, RecursionError):
            old = None
        if isinstance(old, dict) and old.get("params") == params and all(_is_ours(root, c) for c in classes):
            n_files = sum(1 for c in classes for p in (root / c).rglob("*.png"))
            if n_files == old.get("n_files"):
                return root
    for c in classes:
        if (root / c).exists() and not _is_ours(root, c) and not overwrite:
            msg = f"{str(root / c)!r} exists and was not written by make_embedded_dataset (pass overwrite=True to replace it)"
            raise FileExistsError(msg)
    # only folders this function can prove it wrote (its marker inside, a plain name under root) are
    # deleted: names read from embedded.json are never trusted, whatever they say
    stale = {p.name for p in root.iterdir() if _is_ours(root, p.name)} if root.is_dir() else set()
    for c in sorted(stale | set(classes)):
        folder = root / c
        if folder.is_symlink():
            msg = f"{str(folder)!r} is a symbolic link; make_embedded_dataset does not replace links: remove it"
            raise FileExistsError(msg)
        if folder.exists():
            shutil.rmtree(folder)
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
        (cdir / MARKER).write_text(json.dumps({"written_by": "raid_fast.data.make_embedded_dataset", "class": c}))
        for i in range(n_train):
            rng = np.random.default_rng([seed, ci, 0, i])
            _save_png(texture_crop(tex, image_size, rng), cdir / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            rng = np.random.default_rng([seed, ci, 1, i])
            image = texture_crop(tex, image_size, rng)
            if i >= n_test_good - n_test_relit:
                _save_png(relight(image, rng), cdir / "test" / "good" / f"{i:03d}_relit.png")
            else:
                _save_png(image, cdir / "test" / "good" / f"{i:03d}.png")
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
