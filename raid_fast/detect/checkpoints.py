"""Filter checkpoints: one file per state (weights, optimizer, config, epoch, history, RNG state),
written atomically; read by training (resume), evaluation and prediction.

A checkpoint is data, never code: a safetensors file whose tensors are the filter's weights, the
optimizer's tensors and the RNG states, and whose metadata holds the rest as JSON (format and
version, the training config, the filter's dimensions, epoch, step, history, the optimizer's
plain settings, the run id and the record of the best epoch), plus a SHA-256 of every tensor.
Loading checks the format, the version, every checksum and every field's type and builds the
filter only from dimensions that match the stored weights. Files of the old format (a pickle, as
``torch.save`` writes) are refused unread: unpickling can run any code the file carries.
:func:`convert_legacy_checkpoint` converts one whose origin you trust, with ``torch.load``'s
restricted ``weights_only`` unpickler.

``last.pt`` and ``best.pt`` of a run are kept consistent through any interruption: training writes
``last.pt`` first, and it records the best epoch and a digest of its weights; when the best epoch is
the last one, ``last.pt`` holds the same weights, so :func:`repair_best` can rewrite a ``best.pt``
that an interruption left behind, and a ``best.pt`` that does not match the record is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raid_fast import _fileio
from raid_fast.detect.filter import GuidedMoEFilter

FORMAT = "raid_fast.FilterCheckpoint"
FORMAT_VERSION = 1

FILTER_ARG_TYPES = {
    "dim": int,
    "k": int,
    "n_guidance_experts": int,
    "guidance_top_k": int,
    "n_denoise_experts": int,
    "router_patch": int,
    "gate_scale": float,
    "router_noise": float,
}
ROLES = ("last", "best")
# the fields of a checkpoint dict besides its tensors, and the JSON types they must have
_STATE_TYPES = {
    "config": dict,
    "filter_args": dict,
    "epoch": int,
    "step": int,
    "history": dict,
    "run_id": str,
    "role": str,
    "best": (dict, type(None)),
}
_LEGACY_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a bare pickle (protocol 2+)


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def weights_digest(model_state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(model_state):
        t = model_state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _encode(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint dict -> (tensors, metadata strings) for safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state["model"].items():
        tensors[f"model/{name}"] = t.detach().cpu().clone().contiguous()
    opt = state["optimizer"]
    opt_state: dict[str, dict[str, Any]] = {}
    for pid, entries in opt["state"].items():
        plain = {}
        for key, v in entries.items():
            if torch.is_tensor(v):
                tensors[f"optimizer/{int(pid)}/{key}"] = v.detach().cpu().clone().contiguous()
            else:
                plain[key] = v
        opt_state[str(int(pid))] = plain
    rng = state["rng"]
    tensors["rng/torch"] = rng["torch"].clone()
    for i, s in enumerate(rng.get("cuda", [])):
        tensors[f"rng/cuda/{i}"] = s.clone()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = rng["numpy"]
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(np_keys, dtype=np.int64))
    py_version, py_state, py_gauss = rng["python"]
    plain_state = {key: state[key] for key in _STATE_TYPES}
    plain_state["optimizer"] = {"param_groups": opt["param_groups"], "state": opt_state}
    plain_state["rng"] = {
        "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [py_version, list(py_state), py_gauss],
        "n_cuda": len(rng.get("cuda", [])),
    }
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "state": json.dumps(plain_state),
        "sha256": json.dumps({name: _sha256(t) for name, t in tensors.items()}),
    }
    return tensors, meta


def save_checkpoint(path: os.PathLike, state: dict) -> None:
    """Writes ``state`` atomically (a unique temporary in the same folder, then ``os.replace``).

    ``state`` holds ``model`` (a state dict), ``optimizer`` (``optimizer.state_dict()``),
    ``config``, ``filter_args``, ``epoch``, ``step``, ``history``, ``rng`` (:func:`rng_state`),
    ``run_id``, ``role`` (``"last"`` or ``"best"``) and ``best`` (None or ``{"epoch", "digest"}``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = _encode(state)
    _fileio.atomic_write(path, lambda tmp: save_file(tensors, os.fspath(tmp), metadata=meta))


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"{str(path)!r} is not a valid filter checkpoint: {what}")


def _legacy_message(path: Path) -> str:
    return (
        f"{str(path)!r} is an old-format (pickled) filter checkpoint; raid_fast no longer reads pickles, "
        "since unpickling a file can run any code it carries. Retrain the filter, or convert the file "
        f"once if you trust its origin: raid-fast convert-checkpoint {str(path)!r} NEW.pt"
    )


def _read_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        msg = f"filter checkpoint not found: {str(path)!r}"
        raise FileNotFoundError(msg)
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types on damaged headers
        # only the file's first bytes are looked at, never unpickled
        with path.open("rb") as fh:
            head = fh.read(8)
        if head.startswith(_LEGACY_MAGIC):
            raise ValueError(_legacy_message(path)) from None
        msg = f"{str(path)!r} is not a filter checkpoint written by `raid-fast train` (damaged, truncated or another kind of file: {exc})"
        raise ValueError(msg) from None
    return meta, tensors


def _json(path: Path, meta: dict, key: str) -> Any:
    if key not in meta:
        raise _bad(path, f"metadata {key!r} is missing")
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"metadata {key!r} is not valid JSON ({type(exc).__name__})") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _decode(path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Validated metadata and tensors -> the checkpoint dict (CPU tensors)."""
    if meta.get("format") != FORMAT:
        msg = f"{str(path)!r} is not a filter checkpoint written by `raid-fast train` (format {meta.get('format')!r})"
        raise ValueError(msg)
    if meta.get("format_version") != str(FORMAT_VERSION):
        msg = (
            f"{str(path)!r} has filter-checkpoint format version {meta.get('format_version')!r}; this raid_fast "
            f"reads version {FORMAT_VERSION}: retrain the filter"
        )
        raise ValueError(msg)
    sums = _json(path, meta, "sha256")
    if not isinstance(sums, dict) or set(sums) != set(tensors):
        raise _bad(path, "the checksums (metadata 'sha256') do not cover exactly its tensors; the file was altered")
    bad = [name for name, t in tensors.items() if sums[name] != _sha256(t)]
    if bad:
        raise _bad(path, f"checksum mismatch in {bad[:4]} (damaged file)")
    plain = _json(path, meta, "state")
    if not isinstance(plain, dict):
        raise _bad(path, "metadata 'state' must be a JSON object")
    for key, types in {**_STATE_TYPES, "optimizer": dict, "rng": dict}.items():
        if key not in plain:
            raise _bad(path, f"field {key!r} is missing")
        v = plain[key]
        if not isinstance(v, types) or (types is int and (isinstance(v, bool) or v < 0)):
            raise _bad(path, f"field {key!r} has type {type(v).__name__} {str(v)[:40]}")
    if plain["role"] not in ROLES:
        raise _bad(path, f"field 'role' must be one of {list(ROLES)}, got {plain['role']!r}")
    best = plain["best"]
    if best is not None and not (
        _is_int(best.get("epoch")) and isinstance(best.get("digest"), str) and set(best) == {"epoch", "digest"}
    ):
        raise _bad(path, f"field 'best' must be null or {{'epoch': int, 'digest': str}}, got {str(best)[:60]}")
    fargs = plain["filter_args"]
    for name, v in fargs.items():
        want = FILTER_ARG_TYPES.get(name)
        ok = want is not None and (
            _is_int(v) if want is int else isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        if not ok:
            raise _bad(path, f"filter_args[{name!r}] = {str(v)[:40]} is not a known filter setting")
    history = plain["history"]
    if not all(isinstance(history.get(k), list) for k in ("epochs", "step_loss")):
        raise _bad(path, "history must hold the lists 'epochs' and 'step_loss'")

    model = {name[len("model/") :]: t for name, t in tensors.items() if name.startswith("model/")}
    optimizer = _decode_optimizer(path, plain["optimizer"], tensors)
    rng = _decode_rng(path, plain["rng"], tensors)
    config = dict(plain["config"])
    # JSON object keys are strings: the foreground map's class ids come back as ints
    if isinstance(config.get("foreground"), dict):
        try:
            config["foreground"] = {int(c): m for c, m in config["foreground"].items()}
        except ValueError:
            raise _bad(path, "config['foreground'] must map class ids to modes") from None
    known = {"model/", "optimizer/", "rng/"}
    stray = [name for name in tensors if not any(name.startswith(p) for p in known)]
    if stray:
        raise _bad(path, f"unexpected tensors {stray[:4]}")
    return {
        "model": model,
        "optimizer": optimizer,
        "rng": rng,
        **{key: plain[key] for key in _STATE_TYPES},
        "config": config,
    }


def _decode_optimizer(path: Path, opt: dict, tensors: dict[str, torch.Tensor]) -> dict:
    groups, plain_state = opt.get("param_groups"), opt.get("state")
    if (
        not isinstance(groups, list)
        or not all(isinstance(g, dict) for g in groups)
        or not isinstance(plain_state, dict)
    ):
        raise _bad(path, "optimizer must hold 'param_groups' (a list of objects) and 'state' (an object)")
    state: dict[int, dict[str, Any]] = {}
    for pid, entries in plain_state.items():
        if not (isinstance(pid, str) and pid.isdigit() and isinstance(entries, dict)):
            raise _bad(path, f"optimizer state entry {str(pid)[:20]!r} is malformed")
        state[int(pid)] = dict(entries)
    prefix = "optimizer/"
    for name, t in tensors.items():
        if not name.startswith(prefix):
            continue
        pid, _, key = name[len(prefix) :].partition("/")
        if not (pid.isdigit() and key):
            raise _bad(path, f"unexpected tensor {name!r}")
        state.setdefault(int(pid), {})[key] = t
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _decode_rng(path: Path, rng: dict, tensors: dict[str, torch.Tensor]) -> dict:
    try:
        np_name, np_pos, np_has_gauss, np_gauss = rng["numpy"]
        py_version, py_state, py_gauss = rng["python"]
        n_cuda = int(rng.get("n_cuda", 0))
        out = {
            "torch": tensors["rng/torch"],
            "numpy": (
                str(np_name),
                tensors["rng/numpy"].numpy().astype(np.uint32),
                int(np_pos),
                int(np_has_gauss),
                float(np_gauss),
            ),
            "python": (int(py_version), tuple(int(v) for v in py_state), None if py_gauss is None else float(py_gauss)),
        }
        if n_cuda:
            out["cuda"] = [tensors[f"rng/cuda/{i}"] for i in range(n_cuda)]
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(path, f"the RNG state is malformed ({type(exc).__name__}: {str(exc)[:60]})") from None
    if out["torch"].dtype != torch.uint8 or any(t.dtype != torch.uint8 for t in out.get("cuda", [])):
        raise _bad(path, "the RNG state tensors must be uint8")
    return out


def read_checkpoint(path: os.PathLike) -> dict:
    """The validated checkpoint dict of a file written by :func:`save_checkpoint` (CPU tensors).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for an
    old-format (pickled), damaged, altered or foreign one; nothing in the file is executed.
    """
    path = Path(path)
    meta, tensors = _read_file(path)
    return _decode(path, meta, tensors)


def build_filter(path: os.PathLike, ckpt: dict) -> GuidedMoEFilter:
    """A ``GuidedMoEFilter`` of the checkpoint's dimensions with its weights (CPU).

    The dimensions are checked against the stored weights on the meta device first, so that a
    crafted ``filter_args`` cannot allocate more than the file holds.
    """
    path = Path(path)
    args, model = ckpt["filter_args"], ckpt["model"]
    # the dimensions the routers' weights imply, before anything of the declared size is allocated:
    # router 1 reads G0 (2D channels), router 2 reads cat(G1, C) (3D + K channels)
    r1, r2 = model.get("router1.proj.weight"), model.get("router2.proj.weight")
    dim, k = args.get("dim", 384), args.get("k", 150)
    if (
        r1 is None
        or r2 is None
        or r1.dim() != 4
        or r2.dim() != 4
        or (r1.shape[1], r2.shape[1]) != (2 * dim, 3 * dim + k)
    ):
        shapes = [None if t is None else tuple(t.shape) for t in (r1, r2)]
        raise _bad(path, f"filter_args dim={dim}, k={k} do not match its router weights {shapes}")
    for name in ("n_guidance_experts", "n_denoise_experts", "router_patch"):
        if not 1 <= args.get(name, 1) <= 1024:
            raise _bad(path, f"filter_args[{name!r}] = {args[name]} is out of range [1, 1024]")
    try:
        with torch.device("meta"):
            shape_only = GuidedMoEFilter(**args)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _bad(path, f"filter_args {args} ({exc})") from None
    expected = {name: (tuple(t.shape), t.dtype) for name, t in shape_only.state_dict().items()}
    stored = {name: (tuple(t.shape), t.dtype) for name, t in ckpt["model"].items()}
    if expected != stored:
        diff = sorted(set(expected.items()) ^ set(stored.items()))[:3]
        raise _bad(path, f"its weights do not match filter_args {ckpt['filter_args']} (first differences: {diff})")
    filter = GuidedMoEFilter(**args)  # noqa: A001 (the paper's word)
    filter.load_state_dict(model)
    return filter


def load_checkpoint(path: os.PathLike, filter: nn.Module | None = None, map_location: Any = "cpu"):  # noqa: A002
    """``(filter, checkpoint dict)``; builds a ``GuidedMoEFilter`` from the saved dims when ``filter`` is None.

    See :func:`read_checkpoint` for what is checked. ``best.pt`` is refused when its run's
    ``last.pt`` records another best epoch (an interrupted write): ``raid-fast train --resume``
    repairs it.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    if ckpt["role"] == "best":
        check_best_matches_last(path, ckpt)
    if filter is None:
        filter = build_filter(path, ckpt)  # noqa: A001
    else:
        filter.load_state_dict(ckpt["model"])
    filter.to(map_location)
    return filter, ckpt


def check_best_matches_last(best_path: Path, best: dict) -> None:
    """Raises ``ValueError`` when the ``last.pt`` beside ``best_path`` (same run) records other best weights."""
    from safetensors import safe_open

    last_path = best_path.with_name("last.pt")
    if not last_path.is_file():
        return
    # the record is in last.pt's metadata: its header is enough (its tensors are checked on resume)
    try:
        with safe_open(os.fspath(last_path), framework="pt") as fh:
            last = json.loads((fh.metadata() or {})["state"])
        run_id, record = last["run_id"], last["best"]
    except Exception:  # not a readable checkpoint of this format: nothing to compare with
        return
    if run_id != best["run_id"]:
        return
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("digest"), str)):
        return
    if record is None or record["digest"] != weights_digest(best["model"]):
        msg = (
            f"{str(best_path)!r} does not hold the best epoch that {str(last_path)!r} records "
            f"({None if record is None else record.get('epoch')}; it holds epoch {best['epoch']}): a write was interrupted. "
            f"Run `raid-fast train --resume` on that folder to repair it, or use last.pt"
        )
        raise ValueError(msg)


def repair_best(out_dir: os.PathLike, last: dict) -> str | None:
    """Makes ``out_dir/best.pt`` match the best epoch recorded in ``last`` (the dict of ``last.pt``).

    Returns what was done (``None`` when nothing was needed). A ``best.pt`` that is missing or
    holds other weights is rewritten from ``last.pt`` when the best epoch is ``last.pt``'s own
    epoch (its weights are the best ones); otherwise the best weights are lost and this raises.
    """
    out_dir = Path(out_dir)
    best_path = out_dir / "best.pt"
    record = last["best"]
    current = None
    if best_path.is_file():
        try:
            current = read_checkpoint(best_path)
        except ValueError:
            current = None
    if record is None:
        if current is not None and current["run_id"] == last["run_id"]:
            msg = f"{str(best_path)!r} belongs to this run but last.pt records no best epoch; move it away"
            raise ValueError(msg)
        if best_path.exists():
            msg = f"{str(best_path)!r} does not belong to the run in {str(out_dir)!r}; move it away to resume"
            raise ValueError(msg)
        return None
    if (
        current is not None
        and current["run_id"] == last["run_id"]
        and current["epoch"] == record["epoch"]
        and weights_digest(current["model"]) == record["digest"]
    ):
        return None
    if record["epoch"] == last["epoch"] and weights_digest(last["model"]) == record["digest"]:
        save_checkpoint(best_path, {**last, "role": "best"})
        return f"rewrote best.pt (epoch {record['epoch']}) from last.pt: its last write was interrupted"
    msg = (
        f"{str(best_path)!r} does not hold the best epoch {record['epoch']} that last.pt records and cannot be "
        "rebuilt from last.pt; continue with --overwrite (a new run) or use last.pt"
    )
    raise ValueError(msg)


def checkpoint_files(out_dir: os.PathLike) -> list[Path]:
    """The checkpoint files of a run folder that exist (``last.pt``, ``best.pt``)."""
    out_dir = Path(out_dir)
    return [out_dir / f"{role}.pt" for role in ROLES if (out_dir / f"{role}.pt").exists()]


def convert_legacy_checkpoint(src: os.PathLike, dst: os.PathLike) -> dict:
    """Converts an old-format (pickled) checkpoint into the current format; returns the new dict.

    Reads ``src`` with ``torch.load(weights_only=True)``, torch's restricted unpickler, allowing only
    the numpy types of the stored RNG state; a file that needs anything else is refused. Use it only
    for files whose origin you trust: it is the one place that unpickles.
    """
    import uuid

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        msg = f"checkpoint to convert not found: {str(src)!r}"
        raise FileNotFoundError(msg)
    try:
        multiarray = np._core.multiarray
    except AttributeError:  # numpy < 2
        multiarray = np.core.multiarray
    allowed = [
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]
    try:
        with torch.serialization.safe_globals(allowed):
            old = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = f"{str(src)!r} cannot be converted: it is not a plain old-format checkpoint ({type(exc).__name__}: {str(exc)[:200]})"
        raise ValueError(msg) from None
    needed = ("model", "optimizer", "config", "filter_args", "epoch", "step", "history", "rng")
    if not isinstance(old, dict) or any(k not in old for k in needed):
        msg = f"{str(src)!r} cannot be converted: it lacks the fields {list(needed)} of a raid_fast checkpoint"
        raise ValueError(msg)
    state = {k: old[k] for k in needed}
    history = state["history"]
    best_epoch = history.get("best_epoch") if isinstance(history, dict) else None
    state.update(
        run_id=uuid.uuid4().hex,
        role="last",
        best={"epoch": best_epoch, "digest": weights_digest(state["model"])} if best_epoch == state["epoch"] else None,
    )
    save_checkpoint(dst, state)
    return read_checkpoint(dst)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def filter_args(filter: nn.Module) -> dict:  # noqa: A002
    names = ("dim", "k", "n_guidance_experts", "guidance_top_k", "n_denoise_experts", "router_noise")
    return {n: getattr(filter, n) for n in names if hasattr(filter, n)}
