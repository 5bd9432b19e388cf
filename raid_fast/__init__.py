"""raid_fast: fast retrieval-augmented anomaly detection (RAID).

Two wings. The retrieval library (``retrieve``, ``TokenDatabase``, ``KMeans``, ``ops``) needs
torch, numpy and safetensors only; the compiled extension (``raid_fast._C``) and the Triton kernels
(``raid_fast.kernels``) are optional fast paths chosen by one dispatcher (``raid_fast.backends()``).
The detection application (``raid_fast.detect``, ``raid_fast.data``, ``raid_fast.app``: backbones,
the guided MoE filter, training, ``Detector``, datasets, the CLI) needs the ``detect`` extra; its
names below are imported on first use, so that ``import raid_fast`` works without it.
"""

from __future__ import annotations

import importlib
from typing import Any

from raid_fast import ops
from raid_fast._dispatch import backends
from raid_fast.clustering import KMeans, KMeansResult, kmeans
from raid_fast.database import TokenDatabase
from raid_fast.index import Index
from raid_fast.neighbors import knn
from raid_fast.retrieval import Retrieval, retrieve

__version__ = "0.1.0"

# public name -> module of the detection wing that defines it
_DETECTION = {
    "Backbone": "raid_fast.detect.backbones",
    "available_backbones": "raid_fast.detect.backbones",
    "load_backbone": "raid_fast.detect.backbones",
    "Detector": "raid_fast.detect.detector",
    "Prediction": "raid_fast.detect.detector",
    "GuidedMoEFilter": "raid_fast.detect.filter",
    "TrainConfig": "raid_fast.detect.training",
    "train": "raid_fast.detect.training",
    "export_detector": "raid_fast.detect.export",
    "load_exported": "raid_fast.detect.export",
}


def __getattr__(name: str) -> Any:
    module = _DETECTION.get(name)
    if module is None:
        msg = f"module 'raid_fast' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_DETECTION))


__all__ = [
    "Backbone",
    "Detector",
    "Index",
    "GuidedMoEFilter",
    "KMeans",
    "KMeansResult",
    "Prediction",
    "Retrieval",
    "TokenDatabase",
    "TrainConfig",
    "available_backbones",
    "export_detector",
    "backends",
    "kmeans",
    "knn",
    "load_backbone",
    "load_exported",
    "ops",
    "retrieve",
    "train",
    "__version__",
]
