"""The RAID authors' ten imgaug colour and geometry ops on uint8 [H, W, 3] images, three drawn per
anomaly source (DRAEM recipe).

Every op draws its parameters from the numpy Generator it is given, so the synthesizer stays seeded.
``torchvision.transforms.v2.functional`` applies the ops it has, on a [3, H, W] view of the image;
numpy applies the three it lacks (brightness, hue/saturation, autocontrast with a cutoff).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from raid_fast import _checks


def to_gray(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float32)
    return np.rint(0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2])


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _chw(img: np.ndarray) -> torch.Tensor:
    """[3, H, W] uint8 view of a uint8 [H, W, 3] array (no copy when it is contiguous and writable)."""
    # from_numpy refuses negative strides and warns on read-only arrays
    if not (img.flags.c_contiguous and img.flags.writeable):
        img = np.array(img, order="C")
    return torch.from_numpy(img).permute(2, 0, 1)


def _hwc(t: torch.Tensor, img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] array of a [3, H, W] result, never sharing memory with the input ``img``."""
    out = t.permute(1, 2, 0).numpy()
    # torchvision hands its input back for no-op parameters (posterize to 8 bits)
    return out.copy() if np.may_share_memory(out, img) else np.ascontiguousarray(out)


def _gamma_contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug GammaContrast((0.5, 2.0), per_channel=True): one gamma per channel, and adjust_gamma takes
    # one gamma, so it runs per channel. its uint8 output is floor(255.999 * v) (imgaug: floor(255 * v))
    gamma = rng.uniform(0.5, 2.0, size=3)
    t = _chw(img)
    return _hwc(torch.cat([TF.adjust_gamma(t[c : c + 1], float(g)) for c, g in enumerate(gamma)]), img)


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)) on the luma channel: adding
    # the same delta to R, G and B changes Y by that delta and leaves the chroma untouched.
    # kept in numpy: torchvision's adjust_brightness only multiplies R, G and B (no add, no luma)
    mul, add = rng.uniform(0.8, 1.2), rng.uniform(-30.0, 30.0)
    y = to_gray(img)
    y_new = np.clip(y * mul + add, 0.0, 255.0)
    return to_uint8(img.astype(np.float32) + (y_new - y)[..., None])


def _sharpness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug pillike.EnhanceSharpness(factor=(0, 2)), which is PIL's ImageEnhance.Sharpness: a blend of
    # the image smoothed by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 and the image. adjust_sharpness
    # reproduces PIL, including its untouched 1-pixel border
    factor = rng.uniform(0.0, 2.0)
    return _hwc(TF.adjust_sharpness(_chw(img), float(factor)), img)


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
    # draws; imgaug maps a hue value of 255 to the full circle.
    # kept in numpy: torchvision's adjust_saturation blends with the grey image instead of adding to S,
    # and the additive S needs this HSV round trip, which then shifts the hue as well
    dh, ds = rng.integers(-50, 51, size=2)
    h, s, v = _rgb_to_hsv(img)
    s = np.clip(s + ds / 255.0, 0.0, 1.0)
    return to_uint8(_hsv_to_rgb(h + dh / 255.0, s, v))


def _solarize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug Solarize(0.5, threshold=(32, 128)): applied to half of the images
    apply, thr = rng.random() < 0.5, int(rng.integers(32, 129))
    if not apply:
        return img.copy()
    return _hwc(TF.solarize(_chw(img), thr), img)


def _posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug Posterize(nb_bits=(1, 8))
    bits = int(rng.integers(1, 9))
    return _hwc(TF.posterize(_chw(img), bits), img)


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug Invert(): 255 - v
    return _hwc(TF.invert(_chw(img)), img)


def _autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug pillike.Autocontrast(cutoff=(0, 20)): PIL's per-band stretch after cutting cutoff%
    # of the pixels at each end of the histogram.
    # kept in numpy: torchvision's autocontrast has no cutoff (it stretches min..max)
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
    # imgaug pillike.Equalize(): PIL's ImageOps.equalize per band, which torchvision's equalize reproduces
    return _hwc(TF.equalize(_chw(img)), img)


def _rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # imgaug Affine(rotate=(-45, 45)) with its defaults: bilinear (order=1), about the centre, constant
    # fill 0 (torchvision's fill=None pads grid_sample with zeros)
    angle = float(rng.uniform(-45.0, 45.0))
    return _hwc(TF.rotate(_chw(img), angle, interpolation=TF.InterpolationMode.BILINEAR), img)


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
"""The authors' 10 imgaug ops, in torchvision where it has them: ``name -> fn(uint8 [H, W, 3], rng)``."""


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
