"""A ``Detector`` as one deployable file: ``torch.export`` of its forward pass, compiled and packaged
by AOTInductor (``.pt2``), with the token database, the backbone and the filter weights inside.

Letters: B images, H x W input size.

The package runs from Python: ``load_exported(path)`` imports raid_fast (which registers the custom
ops ``torch.ops.raid_fast.*`` that the program calls) and returns a callable with the detector's
signature, ``images [B, 3, H, W] -> Prediction``. The input size and the batch size are the ones of
the example images (AOTInductor specialises on them). Where AOTInductor cannot compile (no C++
toolchain), ``export_detector(..., package="program")`` writes the ``torch.export`` program instead
(``torch.export.save``), which ``load_exported`` runs as well (eagerly, through the same ops).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from raid_fast import _checks
from raid_fast.detect.detector import Detector, Prediction

PACKAGES = ("aoti", "program")


class _PlainOutputs(torch.nn.Module):
    """The detector with a plain tuple for output (a saved program stores no Python classes)."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.detector(images))


def export_program(detector: Detector, example_images: torch.Tensor) -> torch.export.ExportedProgram:
    """The detector's forward pass (eval mode, no gradients) as a ``torch.export`` program whose
    outputs are the fields of :class:`Prediction`, in order."""
    if not isinstance(detector, Detector):
        msg = f"detector must be a raid_fast.Detector, got {type(detector).__name__}"
        raise TypeError(msg)
    images = _checks.as_tensor("example_images", example_images)
    _checks.check_ndim("example_images", images, (4,), "[B, 3, H, W]")
    detector.eval()
    with torch.no_grad():
        return torch.export.export(_PlainOutputs(detector), (images,))


def export_detector(
    detector: Detector, example_images: torch.Tensor, path: str | os.PathLike, package: str = "aoti"
) -> Path:
    """Writes ``detector`` as one file at ``path`` and returns it.

    Args:
        detector: the ``Detector`` (its filter and database included).
        example_images: [B, 3, H, W] images of the size and batch the package will take.
        path: the ``.pt2`` file to write (replaced atomically).
        package: ``"aoti"`` (AOTInductor: compiled kernels and weights in one package) or
            ``"program"`` (the ``torch.export`` program, run eagerly).
    """
    _checks.check_choice("package", package, PACKAGES)
    path = Path(path)
    if path.is_dir():
        msg = f"path must be a file to write, got the folder {str(path)!r}"
        raise ValueError(msg)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(detector, example_images)
    # written under its final name in a private folder beside the target (the archive records its
    # file name), then moved into place in one rename
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as folder:
        tmp = Path(folder) / path.name
        if package == "aoti":
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        else:
            torch.export.save(program, tmp)
        os.replace(tmp, path)
    return path


class ExportedDetector:
    """A loaded ``.pt2`` detector: ``exported(images) -> Prediction``."""

    def __init__(self, run: Any, kind: str, path: Path) -> None:
        self._run = run
        self.kind = kind
        self.path = path

    def __call__(self, images: torch.Tensor) -> Prediction:
        with torch.no_grad():
            out = self._run(images)
        return Prediction(*out)

    def __repr__(self) -> str:
        return f"ExportedDetector({str(self.path)!r}, kind={self.kind!r})"


def load_exported(path: str | os.PathLike, device: str | None = None) -> ExportedDetector:
    """Loads a file written by :func:`export_detector` (either kind)."""
    import raid_fast.ops  # noqa: F401  (registers the custom ops the program calls)

    path = Path(path)
    if not path.is_file():
        msg = f"no exported detector at {str(path)!r}"
        raise FileNotFoundError(msg)
    try:
        program = torch.export.load(path)
    except Exception:  # not a torch.export program: an AOTInductor package
        program = None
    if program is not None:
        module = program.module()
        if device is not None:
            module = module.to(device)
        return ExportedDetector(module, "program", path)
    runner = torch._inductor.aoti_load_package(str(path))
    return ExportedDetector(runner, "aoti", path)
