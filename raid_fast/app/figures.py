"""Pictures of anomaly maps: heat-map overlays per image and comparison panels, as PNG files.

Letters: B images, H x W pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from raid_fast import _fileio


def heat_colors(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8 (a blue-to-red ramp, readable without matplotlib)."""
    v = np.clip(values, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def write_overlays(
    images: torch.Tensor,
    maps: torch.Tensor,
    scores: torch.Tensor,
    out_dir: os.PathLike,
    names: Sequence[str],
    vmax: float | None = None,
    vmin: float | None = None,
    taken: set[str] | None = None,
) -> list[Path]:
    """PNG of each image beside its anomaly map blended over it; maps share one colour scale
    ``[vmin, vmax]`` (default: the range of ``maps``).

    Files are named ``<parent>_<stem>_score<score>.png``; a name already in ``taken`` (the names
    written so far, updated here; pass one set across batches) gets a ``_2``, ``_3``, ... suffix,
    so that two inputs never overwrite each other's overlay.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lo = float(maps.min()) if vmin is None else vmin
    hi = float(maps.max()) if vmax is None else vmax
    taken = set() if taken is None else taken
    paths = []
    for img, m, s, name in zip(images, maps, scores, names):
        rgb = (img.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        heat = heat_colors((m.cpu().numpy() - lo) / max(hi - lo, 1e-12))
        blend = (0.55 * rgb + 0.45 * heat).astype(np.uint8)
        panel = np.concatenate([rgb, blend], axis=1)
        # the parent folder keeps 'bad/000.png' and 'good/000.png' apart
        base = f"{Path(name).parent.name}_{Path(name).stem}_score{float(s):.3f}"
        stem, n = base, 1
        while stem in taken:
            n += 1
            stem = f"{base}_{n}"
        taken.add(stem)
        paths.append(write_png(panel, out / f"{stem}.png"))
    return paths


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    """``panel`` [H, W, 3] uint8 with a caption bar of ``text`` on top."""
    from PIL import Image, ImageDraw

    bar = Image.new("RGB", (panel.shape[1], 18), (255, 255, 255))
    ImageDraw.Draw(bar).text((4, 3), text, fill=(0, 0, 0))
    return np.concatenate([np.asarray(bar), panel], axis=0)


def comparison_row(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    maps: dict[str, torch.Tensor],
    ranges: dict[str, tuple[float, float]],
    scores: dict[str, float] | None = None,
) -> np.ndarray:
    """One row [H + 18, (2 + len(maps)) * W, 3] uint8: the image, its ground truth (red), and each
    setting's anomaly map blended over the image on that setting's colour range ``(lo, hi)``."""
    rgb = (image.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.float32)  # [H, W, 3]
    cells = [_label(rgb.astype(np.uint8), "image")]
    truth = rgb.copy()
    if mask is not None:
        m = mask.cpu().numpy() > 0.5
        truth[m] = 0.4 * truth[m] + 0.6 * np.array([255.0, 0.0, 0.0])
    cells.append(_label(truth.astype(np.uint8), "ground truth"))
    for name, amap in maps.items():
        lo, hi = ranges[name]
        heat = heat_colors((amap.cpu().numpy() - lo) / max(hi - lo, 1e-12)).astype(np.float32)
        caption = name if scores is None else f"{name}: {scores[name]:.3f}"
        cells.append(_label((0.5 * rgb + 0.5 * heat).astype(np.uint8), caption))
    return np.concatenate(cells, axis=1)


def write_png(array: np.ndarray, path: os.PathLike) -> Path:
    """Writes [H, W, 3] uint8 as PNG atomically (unique temporary file, then rename); returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _fileio.atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), fsync=False)
