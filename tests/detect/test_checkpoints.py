"""Filter checkpoints are data: pickles are refused unread, every field is checked, nothing runs."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raid_fast.detect import checkpoints
from raid_fast.detect import training as rt
from tests.detect.test_training import cfg, make_setup, small_filter


class Payload:
    """Unpickling this creates the file ``path``: the stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def legacy_state(filter=None, **extra):
    """A checkpoint dict as the old format pickled it (torch.save)."""
    filter = filter if filter is not None else small_filter()
    opt = torch.optim.Adam(filter.parameters(), lr=1e-3)
    state = {
        "model": filter.state_dict(),
        "optimizer": opt.state_dict(),
        "config": {"k": 6, "nprobe": 2, "mode": "hierarchical"},
        "filter_args": checkpoints.filter_args(filter),
        "epoch": 1,
        "step": 3,
        "history": {"epochs": [], "step_loss": [], "best_epoch": 1, "best_metric": 0.7},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    state.update(extra)
    return state


@pytest.fixture
def malicious(tmp_path):
    """A pickled checkpoint with valid weights and a payload hidden in its history."""
    sentinel = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    history = {"epochs": [], "step_loss": [], "best_epoch": 1, "best_metric": Payload(sentinel)}
    torch.save(legacy_state(history=history), path)
    return path, sentinel


def test_a_pickled_checkpoint_is_refused_unread(malicious):
    from raid_fast.app.pipelines import load_filter

    path, sentinel = malicious
    for load in (checkpoints.load_checkpoint, checkpoints.read_checkpoint, load_filter):
        with pytest.raises(
            ValueError, match=r"old-format \(pickled\) filter checkpoint.*Retrain the filter, or convert"
        ):
            load(path)
    assert not sentinel.exists(), "the payload ran"


def test_resume_from_a_pickled_last_pt_is_refused(malicious, tmp_path):
    path, sentinel = malicious
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(path.read_bytes())
    bb, db, images, ids = make_setup()
    with pytest.raises(ValueError, match="old-format"):
        rt.train(cfg(run, epochs=2), bb, db, images, ids, filter=small_filter(), resume=True, progress=False)
    assert not sentinel.exists()


def test_convert_reads_plain_old_files_and_refuses_payloads(malicious, tmp_path):
    path, sentinel = malicious
    with pytest.raises(ValueError, match="cannot be converted: it is not a plain old-format checkpoint"):
        checkpoints.convert_legacy_checkpoint(path, tmp_path / "new.pt")
    assert not sentinel.exists() and not (tmp_path / "new.pt").exists()
    plain = tmp_path / "old.pt"
    filter = small_filter(3)
    torch.save(legacy_state(filter), plain)
    ckpt = checkpoints.convert_legacy_checkpoint(plain, tmp_path / "new.pt")
    loaded, _ = checkpoints.load_checkpoint(tmp_path / "new.pt")
    for name, t in filter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert ckpt["epoch"] == 1 and ckpt["config"]["nprobe"] == 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    bb, db, images, ids = make_setup()
    rt.train(cfg(out, epochs=1), bb, db, images, ids, filter=small_filter(), progress=False)
    with safe_open(str(out / "last.pt"), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return out / "last.pt", meta, tensors


def _write(path, tensors, meta, resum=True):
    if resum:
        meta = {**meta, "sha256": json.dumps({k: checkpoints._sha256(t) for k, t in tensors.items()})}
    save_file(tensors, str(path), metadata=meta)
    return path


def _state(meta, **change):
    state = json.loads(meta["state"])
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(state.get(key), dict):
            state[key] = {**state[key], **value}
        else:
            state[key] = value
    return json.dumps(state)


def test_the_saved_file_is_safetensors_with_checksums(saved):
    path, meta, tensors = saved
    assert path.read_bytes()[:8] != b"PK\x03\x04" and meta["format"] == checkpoints.FORMAT
    assert set(json.loads(meta["sha256"])) == set(tensors)
    assert any(k.startswith("model/") for k in tensors) and any(k.startswith("optimizer/") for k in tensors)


CRAFTS = {
    "no checksums": (
        lambda m, t: ({k: v for k, v in m.items() if k != "sha256"}, t, False),
        "metadata 'sha256' is missing",
    ),
    "a flipped weight": (
        lambda m, t: (m, {**t, "model/router1.proj.weight": t["model/router1.proj.weight"] + 1}, False),
        "checksum mismatch",
    ),
    "state not JSON": (lambda m, t: ({**m, "state": "{oops"}, t, True), "metadata 'state' is not valid JSON"),
    "deep JSON": (lambda m, t: ({**m, "state": "[" * 100_000 + "]" * 100_000}, t, True), "is not valid JSON"),
    "state a list": (lambda m, t: ({**m, "state": "[]"}, t, True), "metadata 'state' must be a JSON object"),
    "epoch a string": (lambda m, t: ({**m, "state": _state(m, epoch="1")}, t, True), "field 'epoch' has type str"),
    "unknown filter arg": (
        lambda m, t: ({**m, "state": _state(m, filter_args={"evil": 1})}, t, True),
        r"filter_args\['evil'\] = 1 is not a known filter setting",
    ),
    "huge dims": (
        lambda m, t: ({**m, "state": _state(m, filter_args={"dim": 10**9})}, t, True),
        r"filter_args dim=1000000000, k=6 do not match its router weights \[\(3, 16, 4, 4\), \(3, 30, 4, 4\)\]",
    ),
    "other expert count": (
        lambda m, t: ({**m, "state": _state(m, filter_args={"n_guidance_experts": 2, "guidance_top_k": 1})}, t, True),
        "its weights do not match filter_args",
    ),
    "bad role": (lambda m, t: ({**m, "state": _state(m, role="evil")}, t, True), "field 'role' must be one of"),
    "other format": (
        lambda m, t: ({**m, "format": "x"}, t, True),
        "not a filter checkpoint written by `raid-fast train`",
    ),
    "other version": (lambda m, t: ({**m, "format_version": "9"}, t, True), "format version '9'"),
    "stray tensor": (lambda m, t: (m, {**t, "payload": torch.zeros(2)}, True), r"unexpected tensors \['payload'\]"),
}


@pytest.mark.parametrize("case", list(CRAFTS))
def test_crafted_checkpoints_are_value_errors_naming_the_file(saved, tmp_path, case):
    _, meta, tensors = saved
    craft, match = CRAFTS[case]
    new_meta, new_tensors, resum = craft(meta, tensors)
    path = _write(tmp_path / "crafted.pt", new_tensors, new_meta, resum)
    with pytest.raises(ValueError, match=match) as info:
        checkpoints.load_checkpoint(path)
    assert "crafted.pt" in str(info.value)


def test_damaged_and_foreign_files(tmp_path, saved):
    path, _, _ = saved
    raw = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="is not a filter checkpoint written by `raid-fast train`"):
        checkpoints.load_checkpoint(cut)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint at all")
    with pytest.raises(ValueError, match="is not a filter checkpoint written by `raid-fast train`"):
        checkpoints.load_checkpoint(text)
    with pytest.raises(FileNotFoundError, match="filter checkpoint not found"):
        checkpoints.load_checkpoint(tmp_path / "none.pt")
