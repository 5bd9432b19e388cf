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


@pytest.fixture(scope="module")
def optioned(tmp_path_factory):
    """A database built with non-default token options and image score."""
    root = tiny_embedded_dataset(tmp_path_factory, n_train=3, n_test_good=1, n_test_bad=1)
    path = tmp_path_factory.mktemp("db") / "db16.safetensors"
    wf.build_database(
        [root],
        path,
        image_size=64,
        n_semantic=4,
        kmeans_iters=3,
        progress=False,
        stride=16,
        layers=["blocks.2", "blocks.4"],
        aggregate=3,
        image_score="max",
    )
    return root, path


def test_token_options_and_image_score_are_recorded_and_read_back(optioned):
    root, path = optioned
    db = TokenDatabase.load(path)
    assert db.params["backbone_options"] == {"stride": 16, "layers": [2, 4], "aggregate": 3}
    assert db.params["image_score"] == "max"
    assert db.params["tokens_per_image"] == 16  # 4 x 4 tokens at 64 px, stride 16
    det, _ = wf.detector_from_database(path, nprobe=2)
    assert det.backbone.options == db.params["backbone_options"] and det.image_score.spec == "max"
    # the detector's tokens are the database's: a template retrieves itself at zero cost
    from raid_fast.data import load_datasets

    train = load_datasets([root], split="train", image_size=64)
    out = det.predict(torch.stack([train[0]["image"]]))
    assert out.score_map.shape == (1, 4, 4) and float(out.score_map.abs().max()) < 1e-4
    assert torch.equal(out.score, out.score_map.flatten(1).amax(1))
    # an explicit image score overrides the recorded one
    assert wf.detector_from_database(path, nprobe=2, image_score="top2")[0].image_score.spec == "top2"


def test_training_uses_the_recorded_backbone(optioned, monkeypatch, tmp_path):
    from raid_fast.detect.training import TrainConfig

    root, path = optioned
    seen = {}

    def fake_train(config, backbone, db, *args, **kwargs):
        seen["options"], seen["size"] = backbone.options, backbone.image_size
        return None, {}

    monkeypatch.setattr(wf, "train", fake_train)
    wf.train_filter([root], path, TrainConfig(epochs=1, out_dir=str(tmp_path)), progress=False)
    assert seen == {"options": {"stride": 16, "layers": [2, 4], "aggregate": 3}, "size": (64, 64)}


def test_a_database_without_recorded_options_gets_the_tokens_of_its_time(optioned, tmp_path):
    _, path = optioned
    db = TokenDatabase.load(path)
    del db.params["backbone_options"], db.params["image_score"]
    old = tmp_path / "old.safetensors"
    db.save(old)
    det, _ = wf.detector_from_database(old, nprobe=2)
    # before the options were recorded, efficientnet_lite0 tokens were stride 16 without aggregation
    assert det.backbone.options == {"stride": 16, "layers": [2, 4], "aggregate": 1}
    assert det.image_score.spec == "top1%"
    db.params["backbone_options"] = {"stride": 16, "colour": "red"}
    db.save(old)
    with pytest.raises(ValueError, match=r"backbone_options'\] must be a dict with keys among"):
        wf.detector_from_database(old)
    db.params["backbone_options"] = {"stride": 12}
    db.save(old)
    with pytest.raises(ValueError, match="stride must be one of"):
        wf.detector_from_database(old)


def test_build_database_refuses_a_bad_image_score_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(wf, "load_datasets", lambda *a, **k: pytest.fail("no data should be read"))
    with pytest.raises(ValueError, match="image_score must be"):
        wf.build_database([tmp_path], tmp_path / "db.safetensors", image_score="median")
