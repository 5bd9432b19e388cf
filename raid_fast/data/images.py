"""Image and mask files as tensors: images float32 [3, H, W] in [0, 1], masks float32 [1, H, W] in {0, 1}."""

from __future__ import annotations

import os

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PathLike = str | os.PathLike


def load_image(path: PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Reads an image as float32 [3, H, W] in [0, 1], resized (bicubic) to ``size = (H, W)``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and (im.height, im.width) != size:
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)


def load_mask(path: PathLike, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Reads a mask as float32 [1, H, W] in {0, 1}: binarised (> 127), then resized (nearest)."""
    from PIL import Image

    with Image.open(path) as im:
        binary = Image.fromarray(((np.asarray(im.convert("L")) > 127) * 255).astype(np.uint8))
    if size is not None and (binary.height, binary.width) != size:
        binary = binary.resize((size[1], size[0]), Image.NEAREST)
    return torch.from_numpy((np.asarray(binary) > 127).astype(np.float32))[None]
