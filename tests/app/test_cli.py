"""The command line end to end on a tiny generated dataset: build-db, eval, predict."""

import json

import pytest

from raid_fast.app import cli
from tests.utils import tiny_embedded_dataset


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tiny_embedded_dataset(tmp_path_factory, n_train=6, n_test_good=2, n_test_bad=3)
    db = tmp_path_factory.mktemp("db") / "db.safetensors"
    assert cli.main(["build-db", "--data", str(root), "--out", str(db), "--image-size", "64", "--n-semantic", "8"]) == 0
    return root, db


def test_build_db_records_its_backbone(tiny_dataset):
    from raid_fast import TokenDatabase

    _, db_path = tiny_dataset
    db = TokenDatabase.load(db_path)
    assert db.params["backbone"] == "efficientnet_lite0" and db.params["image_size"] == 64
    assert db.params["class_names"] == ["brick", "grass", "gravel"] and db.n_images == 18


def test_build_db_half_precision_kmeans(tiny_dataset, tmp_path):
    from raid_fast import TokenDatabase

    root, _ = tiny_dataset
    out = tmp_path / "db16.safetensors"
    args = ["build-db", "--data", str(root), "--out", str(out), "--image-size", "64", "--n-semantic", "8"]
    assert cli.main([*args, "--kmeans-precision", "fp16", "--kmeans-iters", "3"]) == 0
    assert TokenDatabase.load(out).params["kmeans_precision"] == "fp16"


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


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    root, db = tiny_dataset
    run = tmp_path_factory.mktemp("run")
    args = ["train", "--data", str(root), "--db", str(db), "--out", str(run), "--epochs", "1", "--batch-size", "4"]
    assert cli.main([*args, "--k", "20", "--nprobe", "3", "--val-fraction", "0.2"]) == 0
    return run


def test_train_writes_resumable_checkpoints(tiny_dataset, trained, tmp_path, capsys):
    import shutil

    import torch

    root, db = tiny_dataset
    ckpt = torch.load(trained / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["config"]["k"] == 20 and ckpt["config"]["image_size"] == 64
    assert (trained / "best.pt").is_file()
    # resume from a copy: one more epoch continues the history instead of restarting it
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    args = ["train", "--data", str(root), "--db", str(db), "--out", str(run), "--epochs", "2", "--batch-size", "4"]
    assert cli.main([*args, "--k", "20", "--nprobe", "3", "--val-fraction", "0.2", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "epoch   1" in printed and "epoch   2" in printed
    resumed = torch.load(run / "last.pt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["history"]["epochs"][0] == ckpt["history"]["epochs"][0]


def test_eval_and_predict_with_a_trained_filter(tiny_dataset, trained, tmp_path, capsys):
    root, db = tiny_dataset
    out = tmp_path / "metrics.csv"
    # k, nprobe and mode come from the checkpoint
    assert (
        cli.main(
            ["eval", "--data", str(root), "--db", str(db), "--filter", str(trained / "best.pt"), "--out", str(out)]
        )
        == 0
    )
    assert "mean" in capsys.readouterr().out and out.read_text().startswith("class,I-AUROC")
    images = sorted(str(p) for p in (root / "grass" / "test").glob("*/001.png"))
    assert (
        cli.main(
            ["predict", *images, "--db", str(db), "--filter", str(trained / "last.pt"), "--out", str(tmp_path / "png")]
        )
        == 0
    )
    assert len(list((tmp_path / "png").glob("*.png"))) == len(images)
    with pytest.raises(ValueError, match="k must equal the filter's cost-volume depth 20, got k=30"):
        cli.main(["eval", "--data", str(root), "--db", str(db), "--filter", str(trained / "last.pt"), "--k", "30"])
    bogus = tmp_path / "bogus.pt"
    import torch

    torch.save({"weights": 1}, bogus)
    with pytest.raises(ValueError, match="is not a filter checkpoint"):
        cli.main(["eval", "--data", str(root), "--db", str(db), "--filter", str(bogus)])
    bogus.write_text("not a checkpoint at all")
    with pytest.raises(ValueError, match="is not a filter checkpoint"):
        cli.main(["eval", "--data", str(root), "--db", str(db), "--filter", str(bogus)])
    with pytest.raises(FileNotFoundError, match="filter checkpoint not found"):
        cli.main(["eval", "--data", str(root), "--db", str(db), "--filter", str(tmp_path / "none.pt")])


def test_train_foreground_needs_known_classes(tiny_dataset, tmp_path):
    root, db = tiny_dataset
    base = ["train", "--data", str(root), "--db", str(db), "--out", str(tmp_path), "--epochs", "1", "--k", "20"]
    with pytest.raises(ValueError, match="'<class>=dark|bright' with a class of the database"):
        cli.main([*base, "--foreground", "screw=dark"])


def test_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("skimage")
    pytest.importorskip("timm")
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--image-size", "64", "--epochs", "1", "--k", "20", "--examples", "2"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    for text in ("retrieval only", "+ MoE filter", "I-AUROC", "AUPRO", "mean"):
        assert text in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"retrieval only", "+ MoE filter"}
    assert set(report["metrics"]["+ MoE filter"]) == {"brick", "grass", "gravel", "mean"}
    assert report["settings"]["k"] == 20 and report["timings_s"]["total"] > 0
    from PIL import Image

    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 6  # 2 per class: one defect, one normal
    assert Image.open(out / "overview.png").size == (4 * 64, 3 * (64 + 18))  # image, truth, 2 maps; 1 row per class
