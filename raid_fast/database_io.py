"""Token-database files: safetensors with a format version, the build parameters and a SHA-256 per
tensor in the metadata, so that a file of another version or a damaged file is an error on load,
never a silent wrong answer. Writes go through a temporary file and an atomic rename."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from raid_fast.database import TokenDatabase

FORMAT = "raid_fast.TokenDatabase"
FORMAT_VERSION = 1


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def save(db: TokenDatabase, path: str | os.PathLike) -> None:
    """Writes ``db`` to ``path`` (see the module docstring)."""
    from safetensors.torch import save_file

    from raid_fast.database import TENSOR_FIELDS

    tensors = {name: getattr(db, name).detach().cpu().contiguous() for name in TENSOR_FIELDS}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "params": json.dumps(db.params),
        "class_purity": json.dumps(db.class_purity),
        "sha256": json.dumps({name: _sha256(t) for name, t in tensors.items()}),
    }
    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    # atomic replace: an interrupted save never leaves a half-written database at `path`
    os.replace(tmp, path)


def load(path: str | os.PathLike, device="cpu", verify: bool = True) -> TokenDatabase:
    """Reads a file written by :func:`save`; a file of another format version or a damaged file
    raises ``ValueError`` naming the path and the problem."""
    from safetensors import safe_open

    from raid_fast.database import TENSOR_FIELDS, TokenDatabase

    path = os.fspath(path)
    if not os.path.isfile(path):
        msg = f"no token database at {path!r}"
        raise FileNotFoundError(msg)
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types on damaged headers
        msg = f"{path!r} is not a readable token database (damaged or truncated file?): {exc}"
        raise ValueError(msg) from exc
    if meta.get("format") != FORMAT:
        msg = f"{path!r} is not a raid_fast token database (format {meta.get('format')!r})"
        raise ValueError(msg)
    if meta.get("format_version") != str(FORMAT_VERSION):
        msg = (
            f"{path!r} has token-database format version {meta.get('format_version')!r}; this raid_fast "
            f"reads version {FORMAT_VERSION}: rebuild the database"
        )
        raise ValueError(msg)
    missing = [name for name in TENSOR_FIELDS if name not in tensors]
    if missing:
        msg = f"{path!r} lacks tensors {missing}"
        raise ValueError(msg)
    if verify:
        sums = json.loads(meta.get("sha256", "{}"))
        bad = [name for name in TENSOR_FIELDS if sums.get(name) != _sha256(tensors[name])]
        if bad:
            msg = f"{path!r} is damaged: checksum mismatch in {bad}"
            raise ValueError(msg)
    db = TokenDatabase(**{name: tensors[name] for name in TENSOR_FIELDS}, params=json.loads(meta.get("params", "{}")))
    db.class_purity = json.loads(meta.get("class_purity", "null"))
    return db.to(device)
