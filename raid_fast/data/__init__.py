"""Datasets: MVTec-layout folders on disk and the embedded default dataset generated from
scikit-image textures (see :mod:`raid_fast.data.mvtec` and :mod:`raid_fast.data.embedded`)."""

from raid_fast._extras import require

require("raid_fast.data")

from raid_fast.data.embedded import (
    EMBEDDED_CLASSES,
    EMBEDDED_DEFECTS,
    make_embedded_dataset,
    render_defect,
    texture_crop,
)
from raid_fast.data.images import IMAGE_EXTENSIONS, load_image, load_mask
from raid_fast.data.mvtec import MultiDataset, MVTecDataset, Sample, load_datasets, select_templates

__all__ = [
    "EMBEDDED_CLASSES",
    "EMBEDDED_DEFECTS",
    "IMAGE_EXTENSIONS",
    "MVTecDataset",
    "MultiDataset",
    "Sample",
    "load_datasets",
    "load_image",
    "load_mask",
    "make_embedded_dataset",
    "render_defect",
    "select_templates",
    "texture_crop",
]
