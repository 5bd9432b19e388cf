"""raid_fast: fast retrieval-augmented anomaly detection (RAID).

Works with torch alone; the compiled extension (``raid_fast._C``) and Triton kernels are optional
fast paths chosen by one dispatcher (see ``raid_fast.backends()``).
"""

from raid_fast import ops
from raid_fast._dispatch import backends as _backends
from raid_fast._dispatch import load_optional_backends
from raid_fast.backbones import Backbone, available_backbones, load_backbone
from raid_fast.database import TokenDatabase
from raid_fast.detector import Detector, Prediction
from raid_fast.kmeans import KMeans, KMeansResult, kmeans
from raid_fast.models import GuidedMoEFilter
from raid_fast.retrieval import Retrieval, retrieve

# the function shadows its module as an attribute of the package: reach the module's other names
# with ``from raid_fast.train import TrainConfig, load_checkpoint`` (a from-import finds the module)
from raid_fast.train import TrainConfig, train

__version__ = "0.1.0"


def backends() -> dict:
    """``{op: {backend: "ok" | reason}}``: which backend can serve which op here, and why not."""
    load_optional_backends()
    return _backends()


__all__ = [
    "Backbone",
    "Detector",
    "GuidedMoEFilter",
    "Prediction",
    "KMeans",
    "KMeansResult",
    "Retrieval",
    "TrainConfig",
    "TokenDatabase",
    "available_backbones",
    "backends",
    "kmeans",
    "load_backbone",
    "ops",
    "retrieve",
    "train",
    "__version__",
]
