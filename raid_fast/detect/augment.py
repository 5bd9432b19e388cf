"""The RAID authors' ten imgaug colour and geometry ops on uint8 [H, W, 3] images, three drawn per
anomaly source (DRAEM recipe)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from raid_fast import _checks


def to_gray(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float32)
    return np.rint(0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2])


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gamma_contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug GammaContrast((0.5, 2.0), per_channel=True)
    gamma = rng.uniform(0.5, 2.0, size=3)
    return to_uint8(255.0 * (img / 255.0) ** gamma)


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)) on the luma channel: adding
    # the same delta to R, G and B changes Y by that delta and leaves the chroma untouched
    mul, add = rng.uniform(0.8, 1.2), rng.uniform(-30.0, 30.0)
    y = to_gray(img)
    y_new = np.clip(y * mul + add, 0.0, 255.0)
    return to_uint8(img.astype(np.float32) + (y_new - y)[..., None])


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
    return to_uint8(smooth + factor * (img.astype(np.float32) - smooth))


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
    return to_uint8(_hsv_to_rgb(h + dh / 255.0, s, v))


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
        lut = to_uint8(np.arange(256) * scale - lo * scale)
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
    return to_uint8(out)


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
