"""The jobs behind the CLI: training queries and their template ids, foreground modes, comparison tables."""

import os
import shutil

import pytest
import torch

from raid_fast import TokenDatabase
from raid_fast.app import pipelines as wf
from raid_fast.app.reports import format_comparison
from tests.utils import tiny_embedded_dataset


@pytest.fixture(scope="module")
def few_shot(tmp_path_factory):
    root = tiny_embedded_dataset(tmp_path_factory, n_train=5, n_test_good=1, n_test_bad=1)
    path = tmp_path_factory.mktemp("db") / "db.safetensors"
    db = wf.build_database([root], path, image_size=64, shots=2, n_semantic=4, kmeans_iters=3, progress=False)
    return root, path, db


def test_training_set_finds_templates_from_any_working_directory(few_shot, tmp_path, monkeypatch):
    root, _, db = few_shot
    monkeypatch.chdir(tmp_path)  # template paths are stored resolved
    images, image_ids, class_ids = wf.training_set([os.path.relpath(root)], db, backbone=None, progress=False)
    assert images.shape == (15, 3, 64, 64)
    in_db = image_ids >= 0
    assert int(in_db.sum()) == 6 and sorted(image_ids[in_db].tolist()) == list(range(6))
    # templates keep their database class; the other images get the class of the same name
    assert torch.equal(class_ids[in_db], db.image_class[image_ids[in_db]])
    assert torch.equal(class_ids, torch.arange(3).repeat_interleave(5))


def test_training_set_routes_non_templates_of_a_label_free_database(few_shot):
    root, _, db = few_shot
    from raid_fast.detect.backbones import load_backbone

    bb = load_backbone("efficientnet_lite0", image_size=64)
    tokens = db.tokens.reshape(db.n_images, -1, db.dim)  # any template tokens will do for the build
    free = TokenDatabase.build(tokens, db.class_prototypes[db.image_class], n_classes=3, n_semantic=2)
    free.params.update({k: db.params[k] for k in ("image_size", "template_paths", "class_names")})
    _, image_ids, class_ids = wf.training_set([root], free, bb, progress=False)
    rest = image_ids < 0
    expected = free.classify(bb(torch.stack([_train_image(root, i) for i in torch.nonzero(rest).flatten()]))[1])
    assert torch.equal(class_ids[rest], expected)


def _train_image(root, i):
    from raid_fast.data import load_datasets

    return load_datasets([root], split="train", image_size=64)[int(i)]["image"]


def test_training_set_rejects_a_class_the_database_lacks(few_shot, tmp_path):
    root, _, db = few_shot
    other = tmp_path / "other" / "carpet" / "train" / "good"
    other.mkdir(parents=True)
    shutil.copy(root / "brick" / "train" / "good" / "000.png", other / "000.png")
    with pytest.raises(ValueError, match="is of class 'carpet', which the database lacks"):
        wf.training_set([tmp_path / "other"], db, backbone=None, progress=False)


def test_foreground_modes(few_shot):
    _, _, db = few_shot
    assert wf.foreground_modes(db, None) is None
    assert wf.foreground_modes(db, ["auto"]) is None  # textures: whole image, as the authors
    assert wf.foreground_modes(db, ["grass=dark", "gravel=bright"]) == {1: "dark", 2: "bright"}
    for bad in (["grass"], ["grass=grey"], ["screw=dark"]):
        with pytest.raises(ValueError, match="foreground must be 'auto' or"):
            wf.foreground_modes(db, bad)
    free = TokenDatabase.build(torch.randn(2, 4, 8), torch.randn(2, 8), n_classes=1, n_semantic=2)
    with pytest.raises(ValueError, match="need a labelled database"):
        wf.foreground_modes(free, ["auto"])


def test_foreground_auto_uses_the_authors_modes():
    db = TokenDatabase.build(torch.randn(3, 4, 8), torch.randn(3, 8), labels=torch.arange(3), n_semantic=2)
    db.params["class_names"] = ["screw", "carpet", "visa/pill"]
    assert wf.foreground_modes(db, ["auto"]) == {0: "dark", 2: "bright"}


def test_format_comparison():
    a = {"x": {"I-AUROC": 0.5, "P-AUROC": 0.25}, "mean": {"I-AUROC": 0.5, "P-AUROC": 0.25}}
    b = {"x": {"I-AUROC": 1.0, "P-AUROC": 0.75}, "mean": {"I-AUROC": 1.0, "P-AUROC": 0.75}}
    lines = format_comparison({"plain": a, "better": b}).splitlines()
    assert lines[0].split() == ["class", "setting", "I-AUROC", "P-AUROC"]
    assert [ln.split() for ln in lines[1:]] == [
        ["x", "plain", "50.0", "25.0"],
        ["x", "better", "100.0", "75.0"],
        ["mean", "plain", "50.0", "25.0"],
        ["mean", "better", "100.0", "75.0"],
    ]
