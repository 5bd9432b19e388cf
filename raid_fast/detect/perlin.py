"""Perlin-noise masks and the Otsu foreground: where a synthetic anomaly goes.

Letters: H x W pixels. Masks are float32 [H, W] holding 0 and 1.
"""

from __future__ import annotations

import math

import numpy as np

from raid_fast import _checks
from raid_fast.detect.augment import to_gray

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
    foreground: np.ndarray | None = None,
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


def foreground_mask(image: np.ndarray, mode: str | None) -> np.ndarray:
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
    gray = to_gray(image).astype(np.uint8)
    t = _otsu_threshold(gray)
    return gray <= t if mode == "dark" else gray > t
