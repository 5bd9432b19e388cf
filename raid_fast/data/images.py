"""Image and mask files as tensors: images float32 [3, H, W] in [0, 1], masks float32 [1, H, W] in {0, 1}.

Every mode Pillow opens is scaled by its own range, never clipped to 8 bits: 8-bit modes (``L``,
``P``, ``RGB``, ``RGBA``, ``LA``, ``CMYK``, ...) by 255, 1-bit (``1``) by 1, 16-bit grayscale
(``I;16`` and its byte orders, and ``I`` holding values in [0, 65535], which is how Pillow opens
16-bit PNGs) by 65535, and float images (``F``) as they are, which must lie in [0, 1]. Grayscale
is repeated to three channels and alpha is dropped. A file that cannot be read, or holds values
that cannot be scaled, raises an error that names it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PathLike = str | os.PathLike

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _read_error(path: PathLike, exc: Exception) -> OSError:
    return OSError(f"cannot read image {str(path)!r} ({type(exc).__name__}: {exc}); is the file complete?")


def _open(path: PathLike):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise _read_error(path, exc) from None
    return im


def _wide_gray(im, path: PathLike) -> np.ndarray:
    """A 16-bit, 32-bit integer or float single-channel image as float32 [H, W] in [0, 1]."""
    arr = np.asarray(im)
    if im.mode in _SIXTEEN_BIT:
        return arr.astype(np.float32) / 65535.0
    if im.mode == "I":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            msg = (
                f"image {str(path)!r} is 32-bit integer (mode I) with values in [{lo}, {hi}]; raid_fast reads "
                "8-bit, 16-bit ([0, 65535]) and float ([0, 1]) images: convert it to one of those"
            )
            raise ValueError(msg)
        return arr.astype(np.float32) / 65535.0
    arr = arr.astype(np.float32)
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
        finite = arr[np.isfinite(arr)]
        rng = f"[{finite.min():.4g}, {finite.max():.4g}]" if finite.size else "no finite value"
        msg = (
            f"image {str(path)!r} is float (mode F) with values outside [0, 1] ({rng}"
            f"{', and NaN/inf' if finite.size < arr.size else ''}); rescale it to [0, 1]"
        )
        raise ValueError(msg)
    return arr


def _resize_float(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of float32 [H, W] to ``size = (H, W)``, clipped back to [0, 1]."""
    from PIL import Image

    out = Image.fromarray(gray, mode="F").resize((size[1], size[0]), Image.BICUBIC)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def load_image(path: PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Reads an image as float32 [3, H, W] in [0, 1], resized (bicubic) to ``size = (H, W)``.

    See the module docstring for how each mode is scaled. Raises ``OSError`` naming the file when
    it is truncated or not an image, ``ValueError`` when its values cannot be scaled to [0, 1].
    """
    from PIL import Image

    im = _open(path)
    with im:
        if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
            gray = _wide_gray(im, path)
            if size is not None and gray.shape != tuple(size):
                gray = _resize_float(gray, size)
            return torch.from_numpy(np.ascontiguousarray(gray))[None].expand(3, -1, -1).contiguous()
        # 8-bit and 1-bit modes: Pillow's own conversion is exact for them
        try:
            rgb = im.convert("RGB")
        except ValueError as exc:
            msg = f"image {str(path)!r} has mode {im.mode!r}, which cannot be converted to RGB ({exc})"
            raise ValueError(msg) from None
        if size is not None and (rgb.height, rgb.width) != tuple(size):
            rgb = rgb.resize((size[1], size[0]), Image.BICUBIC)
        arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)


def image_size(path: PathLike) -> tuple[int, int]:
    """``(H, W)`` of an image file, read from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise _read_error(path, exc) from None


def load_mask(path: PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Reads a mask as float32 [1, H, W] in {0, 1}, then resizes it (nearest).

    Binarised at half its type's range: > 127 for 8-bit masks (0/255, as MVTec writes), > 32767
    for 16-bit ones, > 0.5 for float ones; a mask whose only values are 0 and 1 is read as 0/1,
    whatever its type. Colour masks are read as grayscale.
    """
    from PIL import Image

    im = _open(path)
    with im:
        if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
            arr = np.asarray(im)
            half = 0.5 if im.mode == "F" else (32767 if im.mode != "I" or arr.max(initial=0) > 255 else 127)
        elif im.mode == "1":
            arr, half = np.asarray(im, dtype=np.uint8), 0
        else:
            arr, half = np.asarray(im.convert("L")), 127
    values = np.unique(arr)
    binary = arr > 0 if np.isin(values, (0, 1)).all() else arr > half
    if size is not None and binary.shape != tuple(size):
        resized = Image.fromarray(binary.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
        binary = np.asarray(resized) > 127
    return torch.from_numpy(binary.astype(np.float32))[None]
