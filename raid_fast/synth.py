"""Synthetic anomalies for self-supervised training (DRAEM recipe, as the RAID authors use it).

Letters: H x W pixels, C = 3 channels. Images are either ``uint8 [H, W, 3]`` (the authors'
layout) or ``float [3, H, W]`` in [0, 1] (this package's tensors); masks are ``float32 [H, W]``
holding 0 and 1.

One anomalous sample is made in four steps (reference/official-code-digest.md section 7):

1. With probability ``p_normal`` (0.5) the sample stays normal: the image unchanged, an all-zero
   mask.
2. A Perlin-noise mask: 2D Perlin noise at the image size with 2^a x 2^b lattice cells
   (a, b uniform in 0..5), rotated by an angle in [-90, 90] degrees, thresholded at
   ``threshold`` (0.3, the authors' value; DRAEM uses 0.5), optionally multiplied by a
   foreground mask.
3. An anomaly source, one of two kinds with equal odds:

   - ``"structure"``: ``augment(image)`` cut into an 8 x 8 grid of blocks that are shuffled and
     reassembled;
   - ``"texture"``: a random image from ``texture_dir`` (e.g. DTD), resized to the image size
     and augmented. Without ``texture_dir`` it falls back to ``augment(image)``, which is what
     the authors' released code effectively does (its DTD image is overwritten by a bug); with a
     folder the textures are really used, as DRAEM and the paper intend.

   ``augment`` applies 3 distinct ops drawn from the 10 imgaug ops the authors use, reimplemented
   here in numpy (:data:`AUGMENTATIONS`).
4. Blend: ``beta ~ U(0, 0.8)``, ``out = img * (1 - m) + (1 - beta) * src * m + beta * img * m``.

Pixels outside the returned mask are bit-identical to the input; pixels inside it take the blend
(they keep their value only where the source happens to equal the image there).

Determinism: every random draw comes from one ``numpy.random.Generator``. ``AnomalySynthesizer``
takes a ``seed``; calling it with an integer index uses ``default_rng([seed, index])``, so sample
``i`` is the same whatever the order or the worker that asks for it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from raid_fast import _checks

__all__ = [
    "AUGMENTATIONS",
    "FOREGROUND_MODES",
    "AnomalySynthesizer",
    "augment",
    "foreground_mask",
    "perlin_mask",
    "perlin_noise",
    "structure_source",
]

# The authors' per-class restriction of synthetic anomalies to the Otsu foreground (MVTec-AD and
# VisA class names); classes not listed (textures, cable, transistor, capsules, pcb1-4) use the
# whole image.
FOREGROUND_MODES: dict[str, str] = {
    **dict.fromkeys(("screw", "bottle", "capsule", "zipper"), "dark"),
    **dict.fromkeys(
        (
            "hazelnut",
            "pill",
            "metal_nut",
            "toothbrush",
            "candle",
            "cashew",
            "chewinggum",
            "fryum",
            "macaroni1",
            "macaroni2",
            "pipe_fryum",
        ),
        "bright",
    ),
}

TEXTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

RngLike = Union[np.random.Generator, int, None]


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int],
    res: tuple[int, int],
    rng: np.random.Generator,
    angle: float = 0.0,
) -> np.ndarray:
    """2D gradient (Perlin) noise, optionally rotated, as in DRAEM's ``rand_perlin_2d_np``.

    The noise is a continuous function of the position, so the rotation evaluates it at rotated
    pixel coordinates (about the image centre) instead of resampling a rotated image: no corners
    fall outside, and any ``shape`` works (DRAEM needs ``shape`` divisible by ``res``).

    Args:
        shape: (H, W) output size in pixels.
        res: (ry, rx) number of lattice cells along y and x over the image (DRAEM's ``res``).
        rng: source of the random gradient directions.
        angle: rotation in degrees.

    Returns:
        float64 [H, W], values in about [-1, 1] (scaled by sqrt(2) as DRAEM does).
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = float(res[0]), float(res[1])
    yy, xx = np.meshgrid(np.arange(h) + 0.5 - h / 2.0, np.arange(w) + 0.5 - w / 2.0, indexing="ij")
    if angle:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        yy, xx = c * yy - s * xx, s * yy + c * xx
    # lattice units, shifted so the smallest coordinate lies in the first cell
    u = yy * (ry / h)
    v = xx * (rx / w)
    u -= math.floor(u.min())
    v -= math.floor(v.min())
    i0 = np.floor(u).astype(np.int64)
    j0 = np.floor(v).astype(np.int64)
    fu, fv = u - i0, v - j0
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(int(i0.max()) + 2, int(j0.max()) + 2))
    gy, gx = np.cos(angles), np.sin(angles)

    def corner(di: int, dj: int) -> np.ndarray:
        return gy[i0 + di, j0 + dj] * (fu - di) + gx[i0 + di, j0 + dj] * (fv - dj)

    tu, tv = _fade(fu), _fade(fv)
    n0 = corner(0, 0) + tu * (corner(1, 0) - corner(0, 0))
    n1 = corner(0, 1) + tu * (corner(1, 1) - corner(0, 1))
    return math.sqrt(2.0) * (n0 + tv * (n1 - n0))


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    threshold: float = 0.3,
    min_scale_exp: int = 0,
    max_scale_exp: int = 5,
    rotation: float = 90.0,
    foreground: Optional[np.ndarray] = None,
) -> np.ndarray:
    """A binary Perlin-noise anomaly mask (DRAEM / the RAID authors' recipe).

    Draws ``a, b`` uniformly in ``[min_scale_exp, max_scale_exp]``, Perlin noise with
    ``2^a x 2^b`` cells, an angle in ``[-rotation, rotation]`` degrees, and keeps the pixels whose
    noise exceeds ``threshold``. The mask may be empty (rarely, at small scales).

    Args:
        shape: (H, W).
        rng: numpy Generator.
        threshold: noise level above which a pixel is anomalous; lower means larger masks.
        min_scale_exp: smallest exponent of the lattice scale.
        max_scale_exp: largest exponent of the lattice scale (inclusive).
        rotation: largest absolute rotation angle in degrees.
        foreground: optional [H, W] bool/0-1 mask multiplied into the result.

    Returns:
        float32 [H, W] with values in {0, 1}.
    """
    sy = 2 ** int(rng.integers(min_scale_exp, max_scale_exp + 1))
    sx = 2 ** int(rng.integers(min_scale_exp, max_scale_exp + 1))
    angle = float(rng.uniform(-rotation, rotation))
    noise = perlin_noise(shape, (sy, sx), rng, angle)
    mask = noise > threshold
    if foreground is not None:
        fg = np.asarray(foreground)
        if fg.shape != tuple(shape):
            msg = f"foreground must be [H, W] = {tuple(shape)}, got shape {fg.shape}"
            raise ValueError(msg)
        mask &= fg > 0
    return mask.astype(np.float32)


def _otsu_threshold(gray: np.ndarray) -> int:
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * levels)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return int(np.argmax(between))


def foreground_mask(image: np.ndarray, mode: Optional[str]) -> np.ndarray:
    """Otsu foreground mask, the authors' per-class restriction of synthetic anomalies.

    Args:
        image: uint8 [H, W, 3].
        mode: ``"dark"`` keeps pixels darker than the Otsu threshold (their screw, bottle, capsule,
            zipper), ``"bright"`` keeps brighter ones (hazelnut, pill, metal_nut, ...), ``None``
            keeps the whole image (textures, cable, transistor, pcb*).

    Returns:
        bool [H, W].
    """
    _checks.check_choice("mode", mode, (None, "dark", "bright"))
    h, w = image.shape[:2]
    if mode is None:
        return np.ones((h, w), dtype=bool)
    gray = _gray(image).astype(np.uint8)
    t = _otsu_threshold(gray)
    return gray <= t if mode == "dark" else gray > t


def _gray(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float32)
    return np.rint(0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2])


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gamma_contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug GammaContrast((0.5, 2.0), per_channel=True)
    gamma = rng.uniform(0.5, 2.0, size=3)
    return _to_u8(255.0 * (img / 255.0) ** gamma)


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)) on the luma channel: adding
    # the same delta to R, G and B changes Y by that delta and leaves the chroma untouched
    mul, add = rng.uniform(0.8, 1.2), rng.uniform(-30.0, 30.0)
    y = _gray(img)
    y_new = np.clip(y * mul + add, 0.0, 255.0)
    return _to_u8(img.astype(np.float32) + (y_new - y)[..., None])


def _smooth3x3(img: np.ndarray) -> np.ndarray:
    # PIL ImageFilter.SMOOTH: [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13
    f = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    acc = 4.0 * f[1 : h + 1, 1 : w + 1]
    for dy in range(3):
        for dx in range(3):
            acc = acc + f[dy : dy + h, dx : dx + w]
    return acc / 13.0


def _sharpness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug pillike.EnhanceSharpness(factor=(0, 2)): blend of the smoothed and the original image
    factor = rng.uniform(0.0, 2.0)
    smooth = _smooth3x3(img)
    return _to_u8(smooth + factor * (img.astype(np.float32) - smooth))


def _rgb_to_hsv(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = img.astype(np.float32) / 255.0
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    mx, mn = f.max(-1), f.min(-1)
    delta = mx - mn
    safe = np.where(delta > 0, delta, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = np.where(delta > 0, h / 6.0, 0.0)
    s = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return h, s, mx


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1) * 255.0


def _hue_saturation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug AddToHueAndSaturation((-50, 50), per_channel=True): hue and saturation get their own
    # draws; imgaug maps a hue value of 255 to the full circle
    dh, ds = rng.integers(-50, 51, size=2)
    h, s, v = _rgb_to_hsv(img)
    s = np.clip(s + ds / 255.0, 0.0, 1.0)
    return _to_u8(_hsv_to_rgb(h + dh / 255.0, s, v))


def _solarize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug Solarize(0.5, threshold=(32, 128)): applied to half of the images
    apply, thr = rng.random() < 0.5, int(rng.integers(32, 129))
    if not apply:
        return img.copy()
    return np.where(img >= thr, 255 - img, img).astype(np.uint8)


def _posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug Posterize(nb_bits=(1, 8))
    bits = int(rng.integers(1, 9))
    keep = np.uint8((0xFF << (8 - bits)) & 0xFF)
    return img & keep


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (255 - img).astype(np.uint8)


def _autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug pillike.Autocontrast(cutoff=(0, 20)): PIL's per-band stretch after cutting cutoff%
    # of the pixels at each end of the histogram
    cutoff = int(rng.integers(0, 21))
    out = np.empty_like(img)
    for c in range(img.shape[-1]):
        band = img[..., c]
        hist = np.bincount(band.ravel(), minlength=256)
        cut = hist.sum() * cutoff / 100.0
        lo = int(np.searchsorted(np.cumsum(hist), cut, side="right"))
        hi = 255 - int(np.searchsorted(np.cumsum(hist[::-1]), cut, side="right"))
        if hi <= lo:
            out[..., c] = band
            continue
        scale = 255.0 / (hi - lo)
        lut = _to_u8(np.arange(256) * scale - lo * scale)
        out[..., c] = lut[band]
    return out


def _equalize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # PIL ImageOps.equalize, per band
    out = np.empty_like(img)
    for c in range(img.shape[-1]):
        band = img[..., c]
        hist = np.bincount(band.ravel(), minlength=256).astype(np.int64)
        nonzero = hist[hist > 0]
        step = (int(hist.sum()) - int(nonzero[-1])) // 255
        if step == 0:
            out[..., c] = band
            continue
        lut = np.minimum((step // 2 + np.cumsum(hist) - hist) // step, 255).astype(np.uint8)
        out[..., c] = lut[band]
    return out


def _rotate_image(img: np.ndarray, angle: float, cval: float = 0.0) -> np.ndarray:
    """Bilinear rotation about the centre, constant fill (imgaug Affine's defaults)."""
    h, w = img.shape[:2]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2.0, np.arange(w) - (w - 1) / 2.0, indexing="ij")
    # inverse map: where each output pixel comes from
    sy = c * yy + s * xx + (h - 1) / 2.0
    sx = -s * yy + c * xx + (w - 1) / 2.0
    y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
    fy, fx = (sy - y0)[..., None], (sx - x0)[..., None]
    f = np.pad(img.astype(np.float32), ((1, 1), (1, 1), (0, 0)), constant_values=cval)
    # indices into the padded image; anything beyond the pad reads the pad value
    y0p, x0p = np.clip(y0 + 1, 0, h + 1), np.clip(x0 + 1, 0, w + 1)
    y1p, x1p = np.clip(y0 + 2, 0, h + 1), np.clip(x0 + 2, 0, w + 1)
    out = (
        f[y0p, x0p] * (1 - fy) * (1 - fx)
        + f[y0p, x1p] * (1 - fy) * fx
        + f[y1p, x0p] * fy * (1 - fx)
        + f[y1p, x1p] * fy * fx
    )
    outside = (sy < -1) | (sy > h) | (sx < -1) | (sx > w)
    out[outside] = cval
    return _to_u8(out)


def _rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug Affine(rotate=(-45, 45))
    return _rotate_image(img, float(rng.uniform(-45.0, 45.0)))


AUGMENTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gamma_contrast": _gamma_contrast,
    "brightness": _brightness,
    "sharpness": _sharpness,
    "hue_saturation": _hue_saturation,
    "solarize": _solarize,
    "posterize": _posterize,
    "invert": _invert,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "rotate": _rotate,
}
"""The authors' 10 imgaug ops, reimplemented in numpy: ``name -> fn(uint8 [H, W, 3], rng)``."""


def augment(image: np.ndarray, rng: np.random.Generator, n_ops: int = 3) -> np.ndarray:
    """Applies ``n_ops`` distinct ops drawn from :data:`AUGMENTATIONS`, in the drawn order.

    Args:
        image: uint8 [H, W, 3].
        rng: numpy Generator.
        n_ops: number of distinct ops (the authors use 3).

    Returns:
        uint8 [H, W, 3], a new array.
    """
    names = list(AUGMENTATIONS)
    n_ops = _checks.check_int("n_ops", n_ops, 0, len(names))
    out = image
    for i in rng.choice(len(names), size=n_ops, replace=False):
        out = AUGMENTATIONS[names[int(i)]](out, rng)
    return out.copy() if out is image else out


def structure_source(image: np.ndarray, rng: np.random.Generator, grid: int = 8) -> np.ndarray:
    """The authors' "structure" source: ``augment(image)`` cut into ``grid x grid`` shuffled blocks.

    Blocks are ``H // grid x W // grid``; rows and columns beyond ``grid`` whole blocks keep the
    augmented image.

    Args:
        image: uint8 [H, W, 3].
        rng: numpy Generator.
        grid: blocks per side.

    Returns:
        uint8 [H, W, 3].
    """
    aug = augment(image, rng)
    h, w = aug.shape[:2]
    bh, bw = h // grid, w // grid
    if bh == 0 or bw == 0:
        return aug
    core = aug[: bh * grid, : bw * grid]
    blocks = core.reshape(grid, bh, grid, bw, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, bh, bw, 3)
    blocks = blocks[rng.permutation(grid * grid)]
    out = aug.copy()
    out[: bh * grid, : bw * grid] = (
        blocks.reshape(grid, grid, bh, bw, 3).transpose(0, 2, 1, 3, 4).reshape(bh * grid, bw * grid, 3)
    )
    return out


@functools.lru_cache(maxsize=64)
def _load_texture(path: str, h: int, w: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((w, h), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8).copy()
    arr.setflags(write=False)
    return arr


def _list_textures(texture_dir: Union[str, os.PathLike]) -> list[str]:
    root = Path(texture_dir)
    if not root.is_dir():
        msg = f"texture_dir {str(root)!r} does not exist or is not a folder (expected a folder of texture images, e.g. DTD's images/)"
        raise FileNotFoundError(msg)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXTURE_EXTENSIONS)
    if not files:
        msg = f"texture_dir {str(root)!r} holds no image files ({', '.join(TEXTURE_EXTENSIONS)}), searched recursively"
        raise FileNotFoundError(msg)
    return files


def _as_u8_hwc(image: Any) -> tuple[np.ndarray, str]:
    """Returns the uint8 [H, W, 3] working copy and the input layout: ``"u8"`` or ``"float"``."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().cpu().numpy()
    elif isinstance(image, np.ndarray):
        arr = image
    else:
        msg = f"image must be a numpy array or torch tensor, got {type(image).__name__}"
        raise TypeError(msg)
    if arr.dtype == np.uint8:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            msg = f"a uint8 image must be [H, W, 3], got shape {arr.shape}"
            raise ValueError(msg)
        return arr, "u8"
    if np.issubdtype(arr.dtype, np.floating):
        if arr.ndim != 3 or arr.shape[0] != 3:
            msg = f"a float image must be [3, H, W] in [0, 1], got shape {arr.shape}"
            raise ValueError(msg)
        return _to_u8(np.clip(arr.transpose(1, 2, 0), 0.0, 1.0) * 255.0), "float"
    msg = f"image must be uint8 [H, W, 3] or float [3, H, W], got dtype {arr.dtype}"
    raise TypeError(msg)


class AnomalySynthesizer:
    """Makes DRAEM-style synthetic anomalies with exact masks (the RAID authors' recipe).

    Args:
        p_normal: probability that a sample stays normal (image unchanged, zero mask).
        threshold: Perlin threshold (0.3 as the authors; DRAEM uses 0.5).
        texture_dir: folder of texture images (e.g. DTD ``images/``), searched recursively. When
            given, the "texture" source is a random texture from it; when ``None`` the texture
            source falls back to an augmented copy of the image (the authors' effective behaviour).
        seed: seed of the internal generator and of per-index generators.
        p_texture: probability of the "texture" source (else "structure").
        augment_texture: augment the texture image too (DRAEM does); ``False`` pastes it as is.
        grid: blocks per side of the "structure" source.
        max_scale_exp: largest Perlin scale exponent (scales 2^0 .. 2^max).

    Example:
        >>> synth = AnomalySynthesizer(seed=0)
        >>> img, mask = synth(np.zeros((64, 64, 3), np.uint8), 7)   # sample 7, reproducible
        >>> img.shape, mask.shape
        ((64, 64, 3), (64, 64))
    """

    def __init__(
        self,
        p_normal: float = 0.5,
        threshold: float = 0.3,
        texture_dir: Optional[Union[str, os.PathLike]] = None,
        seed: int = 0,
        p_texture: float = 0.5,
        augment_texture: bool = True,
        grid: int = 8,
        max_scale_exp: int = 5,
    ) -> None:
        for name, p in (("p_normal", p_normal), ("p_texture", p_texture)):
            if not 0.0 <= float(p) <= 1.0:
                msg = f"{name} must be in [0, 1], got {p!r}"
                raise ValueError(msg)
        self.p_normal = float(p_normal)
        self.p_texture = float(p_texture)
        self.threshold = float(threshold)
        self.seed = _checks.check_int("seed", seed)
        self.grid = _checks.check_int("grid", grid, 1)
        self.max_scale_exp = _checks.check_int("max_scale_exp", max_scale_exp, 0)
        self.augment_texture = bool(augment_texture)
        self.texture_dir = None if texture_dir is None else Path(texture_dir)
        self.textures = _list_textures(texture_dir) if texture_dir is not None else []
        self._rng = np.random.default_rng(self.seed)

    def _generator(self, rng: RngLike) -> np.random.Generator:
        if rng is None:
            return self._rng
        if isinstance(rng, np.random.Generator):
            return rng
        index = _checks.check_int("rng", rng, 0)
        return np.random.default_rng([self.seed, index])

    def _source(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p_texture:
            return structure_source(img, rng, self.grid)
        if not self.textures:
            # the authors' effective behaviour: their DTD image is overwritten by aug(image)
            return augment(img, rng)
        h, w = img.shape[:2]
        tex = _load_texture(self.textures[int(rng.integers(len(self.textures)))], h, w)
        return augment(tex, rng) if self.augment_texture else tex

    def __call__(
        self,
        image: Any,
        rng: RngLike = None,
        foreground: Optional[Union[np.ndarray, str]] = None,
    ) -> tuple[Any, Any]:
        """Makes one sample.

        Args:
            image: uint8 [H, W, 3] or float [3, H, W] in [0, 1], numpy array or torch tensor.
            rng: a numpy Generator; an int sample index (uses ``default_rng([seed, index])``); or
                ``None`` for the synthesizer's own stream (deterministic sequence from ``seed``).
            foreground: optional restriction of the mask: a [H, W] bool/0-1 array, or ``"dark"`` /
                ``"bright"`` for the Otsu foreground of :func:`foreground_mask`.

        Returns:
            ``(image, mask)``: the image in the input's type, layout, dtype and device, and the
            mask float32 [H, W] in {0, 1} (numpy for numpy input, a tensor on the input's device
            for tensor input). Outside the mask the image is bit-identical to the input.
        """
        u8, layout = _as_u8_hwc(image)
        g = self._generator(rng)
        h, w = u8.shape[:2]
        if g.random() < self.p_normal:
            return self._pack(image, layout, None, np.zeros((h, w), np.float32), 0.0)
        if isinstance(foreground, str):
            foreground = foreground_mask(u8, foreground)
        mask = perlin_mask((h, w), g, self.threshold, 0, self.max_scale_exp, 90.0, foreground)
        src = self._source(u8, g)
        beta = float(g.uniform(0.0, 0.8))
        return self._pack(image, layout, src, mask, beta)

    @staticmethod
    def _pack(image: Any, layout: str, src: Optional[np.ndarray], mask: np.ndarray, beta: float) -> tuple[Any, Any]:
        is_tensor = isinstance(image, torch.Tensor)
        if src is None:
            out = image.clone() if is_tensor else image.copy()
            return out, (torch.from_numpy(mask).to(image.device) if is_tensor else mask)
        m = mask > 0
        if layout == "u8":
            base = image.detach().cpu().numpy() if is_tensor else image
            blended = _to_u8((1.0 - beta) * src.astype(np.float64) + beta * base.astype(np.float64))
            out_np = np.where(m[..., None], blended, base)
            out = torch.from_numpy(out_np).to(image.device) if is_tensor else out_np
        else:
            src_chw = src.transpose(2, 0, 1).astype(np.float64) / 255.0
            if is_tensor:
                src_t = torch.from_numpy(src_chw).to(device=image.device, dtype=image.dtype)
                blended = (1.0 - beta) * src_t + beta * image
                out = torch.where(torch.from_numpy(m).to(image.device)[None], blended, image)
            else:
                blended = ((1.0 - beta) * src_chw + beta * image).astype(image.dtype)
                out = np.where(m[None], blended, image)
        return out, (torch.from_numpy(mask).to(image.device) if is_tensor else mask)
