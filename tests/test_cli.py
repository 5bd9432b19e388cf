"""The command line end to end on a tiny generated dataset: build-db, eval, predict."""

import json

import pytest

from raid_fast import cli


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    pytest.importorskip("skimage")
    pytest.importorskip("timm")
    from raid_fast.data import make_embedded_dataset

    root = make_embedded_dataset(
        tmp_path_factory.mktemp("data") / "embedded", image_size=64, n_train=6, n_test_good=2, n_test_bad=3
    )
    db = tmp_path_factory.mktemp("db") / "db.safetensors"
    assert cli.main(["build-db", "--data", str(root), "--out", str(db), "--image-size", "64", "--n-semantic", "8"]) == 0
    return root, db


def test_build_db_records_its_backbone(tiny_dataset):
    from raid_fast import TokenDatabase

    _, db_path = tiny_dataset
    db = TokenDatabase.load(db_path)
    assert db.params["backbone"] == "efficientnet_lite0" and db.params["image_size"] == 64
    assert db.params["class_names"] == ["brick", "grass", "gravel"] and db.n_images == 18


def test_eval_prints_table_and_writes_json(tiny_dataset, tmp_path, capsys):
    root, db = tiny_dataset
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", "--data", str(root), "--db", str(db), "--k", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "I-AUROC" in printed and "mean" in printed
    results = json.loads(out.read_text())
    assert set(results) == {"brick", "grass", "gravel", "mean"}
    assert 0.5 < results["mean"]["P-AUROC"] <= 1.0


def test_predict_writes_overlays(tiny_dataset, tmp_path, capsys):
    root, db = tiny_dataset
    images = sorted(str(p) for p in (root / "brick" / "test").glob("*/000.png"))
    out = tmp_path / "overlays"
    assert cli.main(["predict", *images, "--db", str(db), "--k", "20", "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(images)
    from PIL import Image

    assert Image.open(pngs[0]).size == (128, 64)  # image beside its overlay


def test_eval_on_a_database_without_backbone_record(tmp_path):
    import torch

    from raid_fast import TokenDatabase

    db = TokenDatabase.build(torch.randn(2, 4, 8), torch.randn(2, 8), n_semantic=2, kmeans_iters=1)
    path = tmp_path / "bare.safetensors"
    db.save(path)
    with pytest.raises(ValueError, match="does not record its backbone"):
        cli.main(["eval", "--data", str(tmp_path), "--db", str(path)])
