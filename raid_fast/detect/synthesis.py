"""Synthetic anomalies for self-supervised training (DRAEM recipe, as the RAID authors use it).

Letters: H x W pixels, C = 3 channels. Images are either ``uint8 [H, W, 3]`` (the authors'
layout) or ``float [3, H, W]`` in [0, 1] (this package's tensors); masks are ``float32 [H, W]``
holding 0 and 1.

One anomalous sample is made in four steps (the authors' ``data_loader.py``):

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
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raid_fast import _checks
from raid_fast.detect.augment import augment, to_uint8
from raid_fast.detect.perlin import foreground_mask, perlin_mask

TEXTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


RngLike = np.random.Generator | int | None


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
    from raid_fast.data.images import load_image

    # the image loader's scaling, so that 16-bit and float textures are not clipped to white or black
    image = load_image(path, (h, w))  # [3, H, W] in [0, 1]
    arr = np.rint(image.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
    arr.setflags(write=False)
    return arr


def _list_textures(texture_dir: str | os.PathLike) -> list[str]:
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
        return to_uint8(np.clip(arr.transpose(1, 2, 0), 0.0, 1.0) * 255.0), "float"
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
        texture_dir: str | os.PathLike | None = None,
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
        foreground: np.ndarray | str | None = None,
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
    def _pack(image: Any, layout: str, src: np.ndarray | None, mask: np.ndarray, beta: float) -> tuple[Any, Any]:
        is_tensor = isinstance(image, torch.Tensor)
        if src is None:
            out = image.clone() if is_tensor else image.copy()
            return out, (torch.from_numpy(mask).to(image.device) if is_tensor else mask)
        m = mask > 0
        if layout == "u8":
            base = image.detach().cpu().numpy() if is_tensor else image
            blended = to_uint8((1.0 - beta) * src.astype(np.float64) + beta * base.astype(np.float64))
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
