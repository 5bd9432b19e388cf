"""Token-database files as untrusted input: crafted files with valid checksums, malformed metadata,
missing checksums, concurrent saves and the temporaries of interrupted saves."""

import json
import os
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import raid_fast as rf
from raid_fast.database_io import _sha256
from tests.library.test_database import make_templates


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    patch, cls, labels = make_templates()
    db = rf.TokenDatabase.build(patch, cls, labels=labels, n_semantic=4, kmeans_iters=3)
    db.params.update({"backbone": "efficientnet_lite0", "image_size": 64, "class_names": ["a", "b", "c"]})
    path = tmp_path_factory.mktemp("db") / "db.safetensors"
    db.save(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return db, path, meta, tensors


def _write(path, tensors, meta, resum=True):
    """Saves a crafted file; with ``resum`` its checksums are recomputed (an attacker's file)."""
    if resum:
        meta = {**meta, "sha256": json.dumps({k: _sha256(t) for k, t in tensors.items()})}
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata=meta)
    return path


def _edit(tensors, name, fn):
    out = {k: v.clone() for k, v in tensors.items()}
    out[name] = fn(out[name])
    return out


def _set(t, index, value):
    t[index] = value
    return t


TENSOR_CRAFTS = {
    "semantic prototypes cut short": (
        "semantic_prototypes",
        lambda t: t[:, :-1],
        r"semantic_prototypes must be \[C=3, S=4, D=16\] \(S from list_offsets\), got shape \(3, 3, 16\)",
    ),
    "NaN class prototype": (
        "class_prototypes",
        lambda t: _set(t, (0, 0), float("nan")),
        "class_prototypes must be finite",
    ),
    "class prototype of another norm": ("class_prototypes", lambda t: t * 2, "class_prototypes must be unit-norm"),
    "offsets ending early": (
        "list_offsets",
        lambda t: _set(t, -1, t[-1] - 3),
        r"list_offsets must be non-decreasing from 0 to N",
    ),
    "offsets not monotone": ("list_offsets", lambda t: _set(t, 2, t[3] + 1), "list_offsets must be non-decreasing"),
    "offsets of another length": ("list_offsets", lambda t: t[:-1], r"list_offsets must be \[C \* S \+ 1\] with C=3"),
    "dtype F32 -> I32": ("tokens", lambda t: t.view(torch.int32), "tokens must be torch.float32, got torch.int32"),
    "token image out of range": (
        "token_image",
        lambda t: _set(t, 0, 99),
        r"token_image must be image ids in \[0, I=12\)",
    ),
    "negative token image": ("token_image", lambda t: _set(t, 5, -1), "token_image must be image ids"),
    "image class out of range": (
        "image_class",
        lambda t: _set(t, 0, 7),
        r"image_class must be class ids in \[0, C=3\)",
    ),
    "image of another class": (
        "image_class",
        lambda t: _set(t, 0, (t[0] + 1) % 3),
        "token_image must be images of the class",
    ),
    "n_semantic beyond S": ("n_semantic", lambda t: _set(t, 0, 9), r"n_semantic must be in \[1, S=4\]"),
    "n_semantic zero": ("n_semantic", lambda t: _set(t, 1, 0), r"n_semantic must be in \[1, S=4\]"),
    "inf token": ("tokens", lambda t: _set(t, (3, 1), float("inf")), "tokens must be finite"),
    "token of another norm": ("tokens", lambda t: _set(t, 4, t[4] * 3), "tokens must be unit-norm"),
    "token_pos negative": ("token_pos", lambda t: _set(t, 0, -4), "token_pos must be positions >= 0"),
    "token_pos shorter": ("token_pos", lambda t: t[:-2], r"token_pos must be \[N="),
    "tokens of another dim": ("tokens", lambda t: t[:, :-1], r"tokens must be \[N >= 1, D=16\]"),
}


@pytest.mark.parametrize("case", list(TENSOR_CRAFTS))
def test_crafted_tensors_with_valid_checksums_are_refused(saved, tmp_path, case):
    _, _, meta, tensors = saved
    name, fn, match = TENSOR_CRAFTS[case]
    path = _write(tmp_path / "crafted.safetensors", _edit(tensors, name, fn), meta)
    with pytest.raises(ValueError, match=match):
        rf.TokenDatabase.load(path)


def _params(meta, **change):
    p = json.loads(meta["params"])
    p.update(change)
    return json.dumps(p)


META_CRAFTS = {
    "params not an object": ({"params": "[1, 2]"}, r"metadata 'params' must be JSON of type dict, got list"),
    "params not JSON": ({"params": "{nope"}, r"metadata 'params' is not valid JSON \(JSONDecodeError"),
    "params deeply nested": ({"params": "[" * 100_000 + "]" * 100_000}, r"metadata 'params' is not valid JSON"),
    "sha256 not an object": ({"sha256": '"abc"'}, r"metadata 'sha256' must be JSON of type dict"),
    "class_purity a string": ({"class_purity": '"high"'}, r"metadata 'class_purity' must be JSON of type"),
    "class_purity above 1": ({"class_purity": "1.5"}, r"'class_purity' must be null or a number in \[0, 1\]"),
    "image_size 65536": ("image_size", 65536, r"params\['image_size'\] must be an int in \[1, 4096\], got 65536"),
    "image_size a string": ("image_size", "256", r"params\['image_size'\] must be an int"),
    "n_semantic disagrees": ("n_semantic", 7, r"params\['n_semantic'\] must be 4 like the tensors, got 7"),
    "dim disagrees": ("dim", 32, r"params\['dim'\] must be 16 like the tensors"),
    "class_labels short": ("class_labels", [0], r"params\['class_labels'\] must be a list of 3 ints"),
    "class_names not strings": ("class_names", [1, 2, 3], r"params\['class_names'\] must be a list of strings"),
    "unknown mode": ("mode", "magic", r"params\['mode'\] must be 'kmeans', 'labels' or 'single'"),
    "backbone not a string": ("backbone", {"eval": 1}, r"params\['backbone'\] must be a string"),
}


@pytest.mark.parametrize("case", list(META_CRAFTS))
def test_malformed_metadata_is_one_value_error_naming_the_field(saved, tmp_path, case):
    _, _, meta, tensors = saved
    change, *rest = META_CRAFTS[case]
    if isinstance(change, dict):
        new_meta, match = {**meta, **change}, rest[0]
        resum = "sha256" not in change
    else:
        value, match = rest
        new_meta, resum = {**meta, "params": _params(meta, **{change: value})}, True
    path = _write(tmp_path / "crafted.safetensors", tensors, new_meta, resum=resum)
    with pytest.raises(ValueError, match=match):
        rf.TokenDatabase.load(path)


def test_a_file_without_checksums_is_refused(saved, tmp_path):
    _, _, meta, tensors = saved
    stripped = {k: v for k, v in meta.items() if k != "sha256"}
    path = _write(tmp_path / "nosum.safetensors", tensors, stripped, resum=False)
    with pytest.raises(ValueError, match="lacks the metadata field 'sha256'"):
        rf.TokenDatabase.load(path)
    with pytest.raises(ValueError, match="lacks the metadata field 'sha256'"):
        rf.TokenDatabase.load(path, verify=False)
    partial = {**meta, "sha256": json.dumps({k: v for k, v in json.loads(meta["sha256"]).items() if k != "tokens"})}
    path = _write(tmp_path / "partial.safetensors", tensors, partial, resum=False)
    with pytest.raises(ValueError, match=r"lacks the checksums \(metadata 'sha256'\) of \['tokens'\]"):
        rf.TokenDatabase.load(path)


def test_extra_tensors_are_refused(saved, tmp_path):
    _, _, meta, tensors = saved
    path = _write(tmp_path / "extra.safetensors", {**tensors, "payload": torch.zeros(3)}, meta)
    with pytest.raises(ValueError, match=r"holds tensors a token database does not have: \['payload'\]"):
        rf.TokenDatabase.load(path)


def test_the_untouched_file_still_loads(saved, tmp_path):
    db, _, meta, tensors = saved
    back = rf.TokenDatabase.load(_write(tmp_path / "same.safetensors", tensors, meta))
    assert torch.equal(back.tokens, db.tokens) and back.params == db.params


def test_concurrent_saves_to_one_path_never_mix(tmp_path):
    """Each writer has its own temporary file: no writer fails, and the file is one writer's whole database."""
    patch, cls, labels = make_templates()
    dbs = [
        rf.TokenDatabase.build(patch, cls, labels=labels, n_semantic=n, kmeans_iters=2, seed=n) for n in (2, 3, 4, 5)
    ]
    path = tmp_path / "shared.safetensors"
    errors = []
    barrier = threading.Barrier(len(dbs))

    def writer(db):
        barrier.wait()
        try:
            for _ in range(15):
                db.save(path)
        except Exception as exc:  # noqa: BLE001 (any failure is the finding)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    back = rf.TokenDatabase.load(path)
    assert any(torch.equal(back.semantic_prototypes, db.semantic_prototypes) for db in dbs)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "shared.safetensors"]


def test_a_save_removes_temporaries_of_interrupted_saves(tmp_path):
    from raid_fast import _fileio

    patch, cls, labels = make_templates()
    db = rf.TokenDatabase.build(patch, cls, labels=labels, n_semantic=2, kmeans_iters=1)
    path = tmp_path / "db.safetensors"
    # what a save killed mid-write leaves: its temporary, named with its (now gone) pid
    dead = _fileio.temp_path(path)
    dead = dead.with_name(dead.name.replace(f".{os.getpid()}-", ".999999999-"))
    dead.write_bytes(b"half a database")
    alive = _fileio.temp_path(path)
    alive = alive.with_name(alive.name.replace(f".{os.getpid()}-", f".{os.getppid()}-"))
    alive.write_bytes(b"a save in progress")
    other = tmp_path / ".db.safetensors.notes.tmp"
    other.write_text("not ours")
    db.save(path)
    assert not dead.exists(), "a stale temporary is cleaned up"
    assert alive.exists() and other.exists(), "a running writer's temporary and other files stay"
    assert rf.TokenDatabase.load(path).n_tokens == db.n_tokens
