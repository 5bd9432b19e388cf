"""Token-database files: safetensors with a format version, the build parameters and a SHA-256 per
tensor in the metadata, so that a file of another version or a damaged file is an error on load,
never a silent wrong answer. Writes go through a unique temporary file and an atomic rename.

Loading trusts nothing in the file: besides the checksums (every tensor must have one), it checks
the structure the search relies on (:func:`check_structure`: dtypes, shapes that agree, CSR offsets
from 0 to N, ids in range, finite unit-norm prototypes and tokens, every token in a list of its
image's class) and the metadata (JSON of the right types, sane parameters), and raises one
``ValueError`` naming the file and the field."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

import torch

from raid_fast import _fileio

if TYPE_CHECKING:
    from raid_fast.database import TokenDatabase

FORMAT = "raid_fast.TokenDatabase"
FORMAT_VERSION = 1

# the largest image side a database may declare (params["image_size"]): every image of a dataset is
# resized to it, so a crafted value would exhaust memory before anything else failed
MAX_IMAGE_SIZE = 4096

_DTYPES = {
    "class_prototypes": torch.float32,
    "semantic_prototypes": torch.float32,
    "n_semantic": torch.int64,
    "tokens": torch.float32,
    "list_offsets": torch.int64,
    "token_image": torch.int64,
    "token_pos": torch.int64,
    "image_class": torch.int64,
}
# unit-norm rows are checked to this tolerance (float32 normalisation, half-precision clustering)
_NORM_TOL = 1e-3


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
    # a unique temporary and an atomic replace: an interrupted save never leaves a half-written
    # database at `path`, and concurrent saves to one path never write into each other's file
    _fileio.atomic_write(path, lambda tmp: save_file(tensors, os.fspath(tmp), metadata=meta))


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
    extra = sorted(set(tensors) - set(TENSOR_FIELDS))
    if extra:
        msg = f"{path!r} holds tensors a token database does not have: {extra}"
        raise ValueError(msg)
    sums = _json_field(path, meta, "sha256", dict)
    no_sum = [name for name in TENSOR_FIELDS if not isinstance(sums.get(name), str)]
    if no_sum:
        msg = f"{path!r} lacks the checksums (metadata 'sha256') of {no_sum}: the file was altered; rebuild it"
        raise ValueError(msg)
    if verify:
        bad = [name for name in TENSOR_FIELDS if sums[name] != _sha256(tensors[name])]
        if bad:
            msg = f"{path!r} is damaged: checksum mismatch in {bad}"
            raise ValueError(msg)
    params = _json_field(path, meta, "params", dict)
    purity = _json_field(path, meta, "class_purity", (int, float, type(None)))
    if purity is not None and not (not isinstance(purity, bool) and 0.0 <= purity <= 1.0):
        msg = f"{path!r}: metadata 'class_purity' must be null or a number in [0, 1], got {purity!r}"
        raise ValueError(msg)
    check_structure(tensors, params, source=repr(path))
    db = TokenDatabase(**{name: tensors[name] for name in TENSOR_FIELDS}, params=params)
    db.class_purity = None if purity is None else float(purity)
    return db.to(device)


def _json_field(path: str, meta: dict, key: str, types) -> Any:
    """``json.loads(meta[key])`` of the given type(s), or a ValueError naming the field."""
    text = meta.get(key)
    if text is None:
        msg = f"{path!r} lacks the metadata field {key!r}: the file was not written by raid_fast or was altered"
        raise ValueError(msg)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        msg = f"{path!r}: metadata {key!r} is not valid JSON ({type(exc).__name__}: {str(exc)[:80]})"
        raise ValueError(msg) from None
    if not isinstance(value, types):
        expected = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        msg = f"{path!r}: metadata {key!r} must be JSON of type {expected}, got {type(value).__name__}"
        raise ValueError(msg)
    return value


def _fail(source: str, field: str, expected: str, got: Any) -> None:
    msg = f"{source}: {field} must be {expected}, got {got}"
    raise ValueError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _unit_rows(x: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
    """[R] bool: rows of x [R, D] with unit norm (or exactly zero where ``used`` is False)."""
    norms = x.double().norm(dim=1)
    unit = (norms - 1.0).abs() <= _NORM_TOL
    if used is None:
        return unit
    return torch.where(used, unit, norms == 0)


def check_structure(tensors: dict[str, torch.Tensor], params: dict, source: str = "token database") -> None:
    """Checks every invariant of a token database's tensors and parameters (CPU tensors).

    Raises a ``ValueError`` that names ``source`` and the first field found wrong: dtypes; shapes
    that agree (C classes, S slots, D dims, N tokens, I images); ``list_offsets`` from 0, monotone,
    ending at N; ``n_semantic`` in [1, S]; finite unit-norm class prototypes, used semantic
    prototypes and tokens (unused slots zero); ids in range; every token in a used list of its
    image's class; and the known parameters of the right type and in range.
    """
    for name, dtype in _DTYPES.items():
        t = tensors[name]
        if t.dtype != dtype:
            _fail(source, name, f"{dtype}", f"{t.dtype}")
    cp, sp, ns = tensors["class_prototypes"], tensors["semantic_prototypes"], tensors["n_semantic"]
    tok, off = tensors["tokens"], tensors["list_offsets"]
    timg, tpos, icls = tensors["token_image"], tensors["token_pos"], tensors["image_class"]
    if cp.dim() != 2 or cp.shape[0] < 1 or cp.shape[1] < 1:
        _fail(source, "class_prototypes", "[C >= 1, D >= 1]", f"shape {tuple(cp.shape)}")
    c, d = cp.shape
    # S from the offsets, so that a prototype table cut short disagrees with them
    if off.dim() != 1 or off.numel() < c + 1 or (off.numel() - 1) % c:
        _fail(source, "list_offsets", f"[C * S + 1] with C={c}, S >= 1", f"shape {tuple(off.shape)}")
    s = (off.numel() - 1) // c
    if tuple(sp.shape) != (c, s, d):
        _fail(source, "semantic_prototypes", f"[C={c}, S={s}, D={d}] (S from list_offsets)", f"shape {tuple(sp.shape)}")
    if tuple(ns.shape) != (c,):
        _fail(source, "n_semantic", f"[C={c}]", f"shape {tuple(ns.shape)}")
    if c and not bool(((ns >= 1) & (ns <= s)).all()):
        _fail(source, "n_semantic", f"in [1, S={s}]", f"{ns.tolist()[:8]}")
    if tok.dim() != 2 or tok.shape[0] < 1 or tok.shape[1] != d:
        _fail(source, "tokens", f"[N >= 1, D={d}]", f"shape {tuple(tok.shape)}")
    n = tok.shape[0]
    if int(off[0]) != 0 or int(off[-1]) != n or not bool((off[1:] >= off[:-1]).all()):
        _fail(source, "list_offsets", f"non-decreasing from 0 to N={n}", f"{off.tolist()[:4]} ... {off.tolist()[-2:]}")
    for name, t in (("token_image", timg), ("token_pos", tpos)):
        if tuple(t.shape) != (n,):
            _fail(source, name, f"[N={n}]", f"shape {tuple(t.shape)}")
    if icls.dim() != 1 or icls.shape[0] < 1:
        _fail(source, "image_class", "[I >= 1]", f"shape {tuple(icls.shape)}")
    n_img = icls.shape[0]
    if not bool(((icls >= 0) & (icls < c)).all()):
        _fail(source, "image_class", f"class ids in [0, C={c})", f"range [{int(icls.min())}, {int(icls.max())}]")
    if not bool(((timg >= 0) & (timg < n_img)).all()):
        _fail(source, "token_image", f"image ids in [0, I={n_img})", f"range [{int(timg.min())}, {int(timg.max())}]")
    if not bool((tpos >= 0).all()):
        _fail(source, "token_pos", "positions >= 0", f"minimum {int(tpos.min())}")
    for name, t in (("class_prototypes", cp), ("semantic_prototypes", sp), ("tokens", tok)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            _fail(source, name, "finite", f"{bad} NaN/inf value(s)")
    if not bool(_unit_rows(cp).all()):
        _fail(source, "class_prototypes", "unit-norm rows", "rows of another norm")
    used = torch.arange(s)[None, :] < ns[:, None]  # [C, S]
    if not bool(_unit_rows(sp.reshape(c * s, d), used.reshape(-1)).all()):
        _fail(source, "semantic_prototypes", "unit-norm rows in the used slots and zero rows after", "other rows")
    norms = tok.double().norm(dim=1)
    if not bool((((norms - 1.0).abs() <= _NORM_TOL) | (norms == 0)).all()):
        _fail(source, "tokens", "unit-norm (or zero) rows", "rows of another norm")
    # every token in a used list of its own image's class: the lists are what retrieval searches
    token_list = torch.repeat_interleave(torch.arange(c * s), off[1:] - off[:-1])  # [N]
    if not bool(used.reshape(-1)[token_list].all()):
        _fail(source, "list_offsets", "empty lists beyond each class's n_semantic", "tokens in unused slots")
    if not bool((icls[timg] == token_list // s).all()):
        _fail(source, "token_image", "images of the class whose lists hold their tokens", "tokens of other classes")
    _check_params(params, c, s, d, n_img, source)


def _check_params(p: dict, c: int, s: int, d: int, n_img: int, source: str) -> None:
    """The parameters other code reads; unknown keys are the user's own and left alone."""

    def field(key: str) -> str:
        return f"params[{key!r}]"

    def int_in(key: str, lo: int, hi: int | None = None) -> None:
        if key in p and not (_is_int(p[key]) and p[key] >= lo and (hi is None or p[key] <= hi)):
            _fail(source, field(key), f"an int in [{lo}, {'inf' if hi is None else hi}]", repr(p[key]))

    if "mode" in p and p["mode"] not in ("kmeans", "labels", "single"):
        _fail(source, field("mode"), "'kmeans', 'labels' or 'single'", repr(p["mode"]))
    for key, value in (("n_classes", c), ("n_semantic", s), ("dim", d)):
        if key in p and p[key] != value:
            _fail(source, field(key), f"{value} like the tensors", repr(p[key]))
    int_in("kmeans_iters", 0)
    int_in("tokens_per_image", 1)
    int_in("image_size", 1, MAX_IMAGE_SIZE)
    if "seed" in p and not _is_int(p["seed"]):
        _fail(source, field("seed"), "an int", repr(p["seed"]))
    if "class_labels" in p:
        labels = p["class_labels"]
        if not (isinstance(labels, list) and len(labels) == c and all(_is_int(v) for v in labels)):
            _fail(source, field("class_labels"), f"a list of {c} ints", repr(labels)[:80])
    for key in ("backbone", "kmeans_precision"):
        if key in p and not isinstance(p[key], str):
            _fail(source, field(key), "a string", repr(p[key])[:80])
    if "weights" in p and not isinstance(p["weights"], (str, type(None))):
        _fail(source, field("weights"), "a string or null", repr(p["weights"])[:80])
    for key, length in (("class_names", None), ("template_paths", n_img)):
        if key not in p:
            continue
        v = p[key]
        if not (isinstance(v, list) and all(isinstance(x, str) for x in v) and (length is None or len(v) == length)):
            _fail(source, field(key), f"a list of {'' if length is None else f'{length} '}strings", repr(v)[:80])
    names = p.get("class_names")
    if names is not None and p.get("mode") == "labels" and "class_labels" in p:
        if not all(0 <= v < len(names) for v in p["class_labels"]):
            _fail(source, field("class_labels"), f"indices into class_names ({len(names)})", repr(p["class_labels"]))
